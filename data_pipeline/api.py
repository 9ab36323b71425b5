"""The trainer-facing entry points: `prepare_if_needed`, `build_loader`, `build_eval_loader`, `vocab_size`.

Paths are derived from the inputs when not given: the tokenizer lives under
`<cache_dir>/tokenizers/spm<V>-<hash of sources and settings>/` and the shards under
`<cache_dir>/shards/<hash of sources, tokenizer and settings>/`, so changing any input never reuses stale
files, and an unchanged config finds its files again (idempotent quickstart).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .config import DataConfig
from .loader import ShardEvalLoader, ShardLoader
from .prepare import (
    _brief_source,
    dir_lock,
    mismatch_message,
    prepare_shards,
    read_manifest,
    shard_differences,
    shard_dtype,
    shards_key,
)
from .shards import PackedShards
from .sources import Source, build_source, document_is_val
from .streaming import StreamEvalLoader, StreamLoader
from .tokenizer import TokenizerMeta, load_meta, tokenizer_exists, train_tokenizer

SPLITS = ("train", "val")


def tokenizer_dir(cfg: DataConfig, source: Source) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer
    blob = json.dumps({"source": source.fingerprint(), "vocab": cfg.vocab_size,
                       "max_sentences": cfg.tokenizer_max_sentences, "version": 1}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return os.path.join(cfg.cache_dir, "tokenizers", f"spm{cfg.vocab_size}-{key}")


def shards_dir(cfg: DataConfig, source: Source, meta: TokenizerMeta) -> str:
    if cfg.shards_dir:
        return cfg.shards_dir
    key = shards_key(source, meta, val_fraction=cfg.val_fraction, seed=cfg.shuffle_seed,
                     shard_tokens=cfg.shard_tokens, dtype=shard_dtype(meta.vocab_size, cfg.dtype))
    return os.path.join(cfg.cache_dir, "shards", key[:16])


def ensure_tokenizer(cfg: DataConfig, source: Source | None = None) -> tuple[str, TokenizerMeta]:
    source = source or build_source(cfg)
    path = tokenizer_dir(cfg, source)
    # The metadata is written after the model and names its hash, so both present means complete: a prepared
    # tokenizer is used without the lock, which a read-only cache could not hold.
    if not tokenizer_exists(path):
        with dir_lock(path, "tokenizer directory"):
            if not tokenizer_exists(path):  # another process may have trained it while this one waited
                train_tokenizer(source, path, vocab_size=cfg.vocab_size,
                                max_sentences=cfg.tokenizer_max_sentences, num_threads=cfg.num_proc)
    return path, load_meta(path)


def prepare_if_needed(cfg: DataConfig, *, force: bool = False, require_splits: bool = False) -> dict[str, Any]:
    """Train the tokenizer and (in shards mode) write shards when missing; a no-op when they exist.

    `force` replaces shards of other inputs found in an explicitly configured `shards_dir`. When both
    `tokenizer` and `shards_dir` are given and already hold a matching pair, the raw source is not needed
    (a training node may have the shards but not the corpus they were made from). `require_splits` (training,
    which validates on the val split): refuse, before anything is written, a source whose documents leave the
    train or the val split empty (check_document_splits; shards already prepared are checked by check_splits).
    """
    if cfg.mode == "shards" and cfg.tokenizer and cfg.shards_dir and not force:
        manifest = read_manifest(cfg.shards_dir)
        if manifest is not None and tokenizer_exists(cfg.tokenizer):
            meta = load_meta(cfg.tokenizer)
            try:
                build_source(cfg)
            except FileNotFoundError:
                if manifest["tokenizer"]["sha256"] == meta.model_sha256:
                    return {"tokenizer": cfg.tokenizer, "vocab_size": meta.vocab_size,
                            "shards_dir": cfg.shards_dir, "manifest": manifest}
    source = build_source(cfg)
    if cfg.mode == "shards" and cfg.shards_dir and not force:
        _check_existing_shards(cfg, source)
    if require_splits and not _shards_prepared(cfg, source):
        check_document_splits(source, cfg.val_fraction)
    tok_dir, meta = ensure_tokenizer(cfg, source)
    result: dict[str, Any] = {"tokenizer": tok_dir, "vocab_size": meta.vocab_size, "shards_dir": None}
    if cfg.mode == "shards":
        out = shards_dir(cfg, source, meta)
        manifest = prepare_shards(source, tok_dir, out, val_fraction=cfg.val_fraction, seed=cfg.shuffle_seed,
                                  num_proc=cfg.num_proc, shard_tokens=cfg.shard_tokens, dtype=cfg.dtype,
                                  force=force, progress=cfg.progress)
        result.update(shards_dir=out, manifest=manifest)
    return result


def _shards_prepared(cfg: DataConfig, source: Source) -> bool:
    """Whether shards mode finds its tokenizer and shards made (check_splits then reads their manifest)."""
    if cfg.mode != "shards":
        return False
    path = tokenizer_dir(cfg, source)
    return tokenizer_exists(path) and read_manifest(shards_dir(cfg, source, load_meta(path))) is not None


def check_document_splits(source: Source, val_fraction: float) -> None:
    """A one-line ValueError when the documents of `source` leave the train or the val split empty: the split is
    by whole documents (document_is_val), so one .txt file (one document) always leaves one empty. It reads
    documents only until both splits have one, about 1 / val_fraction of them; a source with no text at all is
    left to the tokenizer, whose message names its empty files."""
    seen = {"train": 0, "val": 0}
    for text in source.documents():
        seen["val" if document_is_val(text, val_fraction) else "train"] += 1
        if seen["train"] and seen["val"]:
            return
        if val_fraction == 0:  # no document can be val: one shows the source is not empty, the rest need no reading
            break
    total = seen["train"] + seen["val"]
    if total == 0:
        return
    empty, full = ("val", "train") if seen["train"] else ("train", "val")
    brief = _brief_source(source.summary())  # type: ignore[attr-defined]
    if val_fraction == 0:
        raise ValueError(f"data.val_fraction=0 leaves the 'val' split of data.source {brief} empty, and training "
                         "validates on it (every trainer.eval_every steps and at the end): set data.val_fraction "
                         "above 0, e.g. 0.02")
    raise ValueError(f"data.source {brief} leaves the {empty!r} split empty: the split is by whole documents, and "
                     f"val_fraction={val_fraction} put all {total} of its document(s) in {full!r}; give the source "
                     "more documents (several .txt files, or a .jsonl with one document per line) or another "
                     "data.val_fraction")


def _check_existing_shards(cfg: DataConfig, source: Source) -> None:
    """Shards of other inputs in an explicit shards_dir are refused BEFORE a tokenizer is trained for them, so
    the refusal leaves nothing behind (prepare_shards checks again with the trained tokenizer's hash)."""
    manifest = read_manifest(cfg.shards_dir)  # type: ignore[arg-type]
    if manifest is None:
        return
    path = tokenizer_dir(cfg, source)
    if tokenizer_exists(path):
        meta = load_meta(path)
        vocab, sha = meta.vocab_size, meta.model_sha256
    else:
        vocab, sha = cfg.vocab_size, None
    differences = shard_differences(manifest, source, vocab_size=vocab, tokenizer_sha256=sha,
                                    val_fraction=cfg.val_fraction, seed=cfg.shuffle_seed,
                                    shard_tokens=cfg.shard_tokens, dtype=shard_dtype(vocab, cfg.dtype))
    if differences:
        raise ValueError(mismatch_message(os.path.abspath(cfg.shards_dir), manifest, differences))  # type: ignore


def _tokenizer(cfg: DataConfig, source: Source | None) -> tuple[str, TokenizerMeta]:
    tok_dir = cfg.tokenizer or tokenizer_dir(cfg, source or build_source(cfg))
    if not tokenizer_exists(tok_dir):
        raise FileNotFoundError(f"no tokenizer at {tok_dir!r}: run `ebt data prepare` "
                                "or data_pipeline.prepare_if_needed first")
    return tok_dir, load_meta(tok_dir)


def _resolved(cfg: DataConfig) -> tuple[Source, str, TokenizerMeta]:
    source = build_source(cfg)
    return (source, *_tokenizer(cfg, source))


def vocab_size(cfg: DataConfig) -> int:
    """The trained tokenizer's vocabulary size (cfg.vocab_size if it is not trained yet: they are equal)."""
    path = cfg.tokenizer or tokenizer_dir(cfg, build_source(cfg))
    return load_meta(path).vocab_size if tokenizer_exists(path) else cfg.vocab_size


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def open_shards(cfg: DataConfig, split: str, context_length: int) -> PackedShards:
    # With explicit tokenizer and shard paths the raw source is not needed (nor even present, maybe).
    source = None if (cfg.tokenizer and cfg.shards_dir) else build_source(cfg)
    _tok_dir, meta = _tokenizer(cfg, source)
    out = cfg.shards_dir or shards_dir(cfg, source, meta)  # type: ignore[arg-type]
    return PackedShards(out, split, context_length, tokenizer_sha256=meta.model_sha256, vocab_size=meta.vocab_size)


def check_splits(cfg: DataConfig, context_length: int) -> None:
    """A one-line ValueError unless the prepared shards serve windows of `context_length` + 1 tokens in both
    splits. The trainer first reads the val split when it evaluates, by default after the last step, so it
    checks before its first step that the val split is there (issue 21: a single .txt file trained every step,
    then failed). Stream mode is not checked: only reading the source would tell."""
    if cfg.mode == "shards":
        for split in SPLITS:
            open_shards(cfg, split, context_length)


def build_loader(cfg: DataConfig, *, split: str, context_length: int, micro_batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0) -> ShardLoader | StreamLoader:
    """Endless loader of LongTensor[micro_batch_size, context_length + 1] with exact state_dict resume."""
    _check_split(split)
    if cfg.mode == "shards":
        return ShardLoader(open_shards(cfg, split, context_length), micro_batch_size=micro_batch_size, rank=rank,
                           world_size=world_size, seed=seed, num_workers=num_workers)
    source, tok_dir, meta = _resolved(cfg)
    return StreamLoader(source, tok_dir, eos_id=meta.eos_id, tokenizer_sha256=meta.model_sha256, split=split,
                        val_fraction=cfg.val_fraction, context_length=context_length,
                        micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                        num_workers=num_workers)


def build_eval_loader(cfg: DataConfig, *, split: str = "val", context_length: int, micro_batch_size: int,
                      rank: int = 0, world_size: int = 1) -> ShardEvalLoader | StreamEvalLoader:
    """Finite loader: every window of the split once (split across ranks); the last batch may be short."""
    _check_split(split)
    if cfg.mode == "shards":
        return ShardEvalLoader(open_shards(cfg, split, context_length), micro_batch_size=micro_batch_size,
                               rank=rank, world_size=world_size)
    source, tok_dir, meta = _resolved(cfg)
    return StreamEvalLoader(source, tok_dir, eos_id=meta.eos_id, split=split, val_fraction=cfg.val_fraction,
                            context_length=context_length, micro_batch_size=micro_batch_size, rank=rank,
                            world_size=world_size)
