"""Read-only view of a shard directory as fixed-length windows of context+1 tokens.

Window w of a shard covers tokens [w*L, w*L + L + 1) with L = context length: consecutive windows share one
token, so every token is a prediction target exactly once. Windows never cross shard files, which keeps a read
to one memmap slice (at most one window's worth of tokens per shard is unused).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .prepare import FORMAT, _brief_source, read_manifest


class PackedShards:
    def __init__(self, shards_dir: str, split: str, context_length: int, *,
                 tokenizer_sha256: str | None = None, vocab_size: int | None = None) -> None:
        manifest = read_manifest(shards_dir)
        if manifest is None:
            raise FileNotFoundError(f"no shard manifest in {shards_dir!r} (run `ebt data prepare`)")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{shards_dir!r}: unknown shard format {manifest.get('format')!r} (want {FORMAT})")
        self.dir = shards_dir
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        made_with = manifest["tokenizer"]["sha256"]
        if tokenizer_sha256 is not None and tokenizer_sha256 != made_with:
            raise ValueError(f"tokenizer hash {tokenizer_sha256[:12]} differs from the hash {made_with[:12]} "
                             f"the shards in {shards_dir!r} were made with")
        vocab = vocab_size if vocab_size is not None else manifest["tokenizer"]["vocab_size"]
        if vocab > np.iinfo(self.dtype).max + 1:
            raise ValueError(f"vocab size {vocab} does not fit the shard dtype {self.dtype.name} of {shards_dir!r}")
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in {shards_dir!r} (have: {', '.join(manifest['splits'])})")
        self.split = split
        self.context_length = context_length
        self.files = [os.path.join(shards_dir, s["file"]) for s in manifest["splits"][split]["shards"]]
        tokens = np.array([s["tokens"] for s in manifest["splits"][split]["shards"]], dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError(_empty_split_message(manifest, split, shards_dir))
        if context_length < 1:
            raise ValueError(f"context length must be positive, got {context_length}")
        for path, count in zip(self.files, tokens.tolist(), strict=True):
            _check_shard_file(path, count, self.dtype, shards_dir)
        per_shard = np.maximum((tokens - 1) // context_length, 0)
        if per_shard.sum() == 0:
            raise ValueError(f"context length {context_length} is longer than the {split!r} shards in "
                             f"{shards_dir!r} can serve (largest shard holds {int(tokens.max())} tokens, "
                             f"a window needs {context_length + 1}); lower the context length "
                             "(model.architecture.context_length) or give the split more text (a larger source or "
                             "data.val_fraction)")
        self.window_starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.n_windows = int(self.window_starts[-1])
        self._maps: list[np.ndarray] | None = None

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # each DataLoader worker opens its own memmaps
        return state

    def _open(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(path, mmap_mode="r") for path in self.files]
        return self._maps

    def read(self, windows: np.ndarray) -> np.ndarray:
        """int64 array [len(windows), L + 1] for global window indices."""
        maps = self._open()
        length = self.context_length
        shard = np.searchsorted(self.window_starts, windows, side="right") - 1
        local = (windows - self.window_starts[shard]) * length
        out = np.empty((len(windows), length + 1), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard.tolist(), local.tolist(), strict=True)):
            out[row] = maps[s][start:start + length + 1]
        return out


def _empty_split_message(manifest: dict[str, Any], split: str, shards_dir: str) -> str:
    """Why a split has no tokens and what to do: the split is by whole documents, so a source of one document
    (a single .txt file) always leaves one split empty, whatever the fraction."""
    other = next(s for s in manifest["splits"] if s != split)
    documents = manifest["splits"][other].get("documents", 0)
    fraction = manifest.get("val_fraction")
    selected = "no documents" if split == "val" else f"every document for {other!r}"
    return (f"split {split!r} of the shards in {shards_dir!r} has no tokens (val_fraction={fraction} selected "
            f"{selected}): data.source {_brief_source(manifest.get('sources'))} is split by whole documents, and "
            f"all {documents} of its document(s) went to {other!r}; give the source more documents (several .txt "
            "files, or a .jsonl with one document per line) or another data.val_fraction (--val-fraction)")


def _check_shard_file(path: str, tokens: int, dtype: np.dtype, shards_dir: str) -> None:
    """A shard must hold the tokens its manifest lists: a truncated or replaced file is named with its expected
    and actual size (np.load's memmap would only say "mmap length is greater than file size")."""
    hint = f"; the shard directory {shards_dir!r} is damaged: delete it to prepare it again"
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ValueError(f"shard file {path!r} is missing{hint}") from None
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _fortran, file_dtype = read_header(handle)
            header = handle.tell()
    except (OSError, ValueError) as error:  # too short for a header, or not an .npy file at all
        raise ValueError(f"shard file {path!r} is not a readable .npy file: expected {tokens * dtype.itemsize} "
                         f"bytes of tokens after an .npy header, found {size} bytes "
                         f"({str(error).splitlines()[0]}){hint}") from None
    if shape != (tokens,) or file_dtype != dtype:
        raise ValueError(f"shard file {path!r} holds {shape} {file_dtype} but the manifest lists {tokens} "
                         f"{dtype.name} tokens{hint}")
    expected = header + tokens * dtype.itemsize
    if size != expected:
        what = "is truncated" if size < expected else "is larger than its manifest says"
        raise ValueError(f"shard file {path!r} {what}: expected {expected} bytes ({tokens} {dtype.name} tokens "
                         f"after a {header}-byte header), found {size}{hint}")
