"""`DataConfig`: everything the data pipeline needs to know, as one plain dataclass.

It is built from YAML by the trainer (so only plain types) and from CLI flags by `ebt tokenizer train` and
`ebt data prepare`, so both paths resolve sources, tokenizers and shard directories the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODES = ("shards", "stream")
# Smallest tokenizer vocabulary: 256 byte pieces, 4 specials and 2 user pieces, plus some room for BPE merges.
MIN_VOCAB = 320


@dataclass
class DataConfig:
    # What to read. "embedded" = the interpreter's stdlib sources (+ Debian python3-doc prose when present);
    # "hf:<name>" = any `datasets` source, streamed; anything else = comma-separated local paths or globs
    # of .txt / .jsonl / .parquet files (directories are searched recursively).
    source: str = "embedded"
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] | None = None
    # Embedded corpus: byte budget (None = everything) and optional overrides of where to look.
    max_bytes: int | None = 16_000_000
    include_docs: bool = True
    stdlib_root: str | None = None
    docs_roots: list[str] | None = None

    # "shards": pre-tokenized packed shards (written by `prepare_if_needed` / `ebt data prepare`).
    # "stream": tokenize on the fly from the source; only the tokenizer is prepared.
    mode: str = "shards"
    cache_dir: str = "data_cache"
    tokenizer: str | None = None  # directory holding tokenizer.model + tokenizer.json; None = under cache_dir
    shards_dir: str | None = None  # None = under cache_dir, keyed by inputs

    # Tokenizer training.
    vocab_size: int = 4096
    tokenizer_max_sentences: int = 200_000

    # Shard writing.
    val_fraction: float = 0.02
    shuffle_seed: int = 0
    num_proc: int = 2
    shard_tokens: int = 1 << 25
    dtype: str = "auto"  # "auto" | "uint16" | "uint32"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB:  # a given tokenizer brings its own size
            raise ValueError(f"data.vocab_size: vocab size {self.vocab_size} is too small (minimum {MIN_VOCAB}: "
                             "256 byte pieces + specials)")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"data.dtype must be auto, uint16 or uint32, got {self.dtype!r}")
        if isinstance(self.hf_data_files, str):
            self.hf_data_files = [self.hf_data_files]
        if isinstance(self.docs_roots, str):
            self.docs_roots = [self.docs_roots]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a mapping, naming any unknown key in the error (typos in YAML are common)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s): {', '.join(unknown)}")
        return cls(**dict(values))
