"""Keeping a copy of the tokenizer a run trains with next to its weights.

The data pipeline keeps a tokenizer under `<data.cache_dir>/tokenizers/spm<V>-<hash>/`, a name derived from the
data config and relative to the directory training ran in, so a run dir alone did not say where its tokenizer
is. `ebt train` therefore copies it into `<run dir>/tokenizer/` and `ebt export` into `<export>/tokenizer/`
(two small files); launch.run_dir.find_tokenizer looks there first, then at what the data config derives.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from data_pipeline.tokenizer import META_FILE, MODEL_FILE, load_meta, tokenizer_exists
from fsutil import atomic_dir
from launch.run_dir import KEPT_DIR, find_tokenizer  # noqa: F401 - find_tokenizer: generate, scoring, train import it here


def copy_tokenizer(source: str, out_dir: Path) -> Path:
    """Copy a tokenizer's two files into out_dir/tokenizer (atomically: a temp dir renamed into place)."""
    dest = out_dir / KEPT_DIR
    with atomic_dir(dest) as tmp:
        for name in (MODEL_FILE, META_FILE):
            shutil.copyfile(Path(source) / name, tmp / name)
    return dest


def keep_run_tokenizer(cfg) -> Path | None:
    """Copy the tokenizer a TrainConfig trains with into its run dir, unless the same one is there already.

    Called by rank 0 once the data is prepared; returns the copy (None when the tokenizer is not on disk)."""
    from data_pipeline.api import tokenizer_dir
    from data_pipeline.sources import build_source

    source = cfg.data.tokenizer or tokenizer_dir(cfg.data, build_source(cfg.data))
    if not tokenizer_exists(source):
        return None
    kept = cfg.run_dir / KEPT_DIR
    if tokenizer_exists(str(kept)) and load_meta(str(kept)).model_sha256 == load_meta(source).model_sha256:
        return kept
    return copy_tokenizer(source, cfg.run_dir)
