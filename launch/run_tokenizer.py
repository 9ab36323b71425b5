"""Which tokenizer a checkpoint was trained with, and keeping a copy of it next to the weights.

The data pipeline keeps a tokenizer under `<data.cache_dir>/tokenizers/spm<V>-<hash>/`, a name derived from the
data config and relative to the directory training ran in, so a run dir alone did not say where its tokenizer
is. `ebt train` therefore copies it into `<run dir>/tokenizer/` and `ebt export` into `<export>/tokenizer/`
(two small files), and `find_tokenizer` looks there first, then at what the data config derives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from data_pipeline.tokenizer import META_FILE, MODEL_FILE, load_meta, tokenizer_exists
from fsutil import atomic_dir

KEPT_DIR = "tokenizer"  # <run dir>/tokenizer and <export dir>/tokenizer


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir that holds `checkpoint` (<run>/checkpoints/step_N), or None for an export dir."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def _data_config(checkpoint: Path):
    """The DataConfig in the checkpoint's (else its run dir's) config.yaml; None when it keeps none (an export)."""
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig

    run_dir = run_dir_of(checkpoint)
    for path in (checkpoint / "config.yaml", *([run_dir / "config.yaml"] if run_dir else [])):
        if path.is_file():
            raw = OmegaConf.to_container(OmegaConf.load(path))
            if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
                return DataConfig.from_dict(raw["data"])
    return None


def find_tokenizer(checkpoint: str | Path, explicit: str | None = None, model_vocab: int | None = None) -> str:
    """The tokenizer dir of a resolved checkpoint or export dir (launch.checkpoint.resolve_checkpoint).

    Order: `explicit` (--tokenizer), the copy in the export or run dir, then the data config's tokenizer.
    With `model_vocab`, a tokenizer of another vocabulary is refused: its ids would mean other pieces.
    """
    checkpoint = Path(checkpoint)
    if explicit is not None:
        if not tokenizer_exists(explicit):
            raise FileNotFoundError(f"--tokenizer {explicit}: no {MODEL_FILE} and {META_FILE} there")
        found = explicit
    else:
        found = _kept_or_derived(checkpoint)
    if model_vocab is not None:
        vocab = load_meta(found).vocab_size
        if vocab != model_vocab:
            raise ValueError(f"tokenizer {found} has {vocab} pieces but the model's vocab_size is {model_vocab}: "
                             "not the tokenizer this model was trained with")
    return found


def _kept_or_derived(checkpoint: Path) -> str:
    run_dir = run_dir_of(checkpoint)
    for kept in (checkpoint / KEPT_DIR, *([run_dir / KEPT_DIR] if run_dir else [])):
        if tokenizer_exists(str(kept)):
            return str(kept)
    data = _data_config(checkpoint)
    if data is None:
        raise ValueError(f"{checkpoint} keeps no tokenizer ({checkpoint / KEPT_DIR} is missing) and no data config "
                         "(an `ebt export` dir from before exports carried one?): pass --tokenizer DIR")
    if data.tokenizer:
        derived = data.tokenizer
    else:
        from data_pipeline.api import tokenizer_dir
        from data_pipeline.sources import build_source

        try:
            derived = tokenizer_dir(data, build_source(data))
        except (FileNotFoundError, ValueError) as error:
            raise FileNotFoundError(f"{checkpoint}: its training data is needed to locate its tokenizer and cannot be "
                                    f"read ({error}); pass --tokenizer DIR") from None
    if not tokenizer_exists(derived):
        where = (f" (data.cache_dir {data.cache_dir!r} is relative to the directory training ran in)"
                 if not os.path.isabs(derived) else "")
        raise FileNotFoundError(f"{checkpoint}: its tokenizer {derived} does not exist{where}; run from that directory "
                                "or pass --tokenizer DIR")
    return derived


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
