"""`ebt data prepare`: stream documents, tokenize them in parallel processes, write packed token shards.

Layout of a shard directory (all of it appears at once, by renaming a finished temp dir):
    manifest.json           token/document counts, tokenizer hash, sources, splits, dtype, key
    train_00000.npy ...     flat token arrays (.npy so np.load(mmap_mode="r") needs no side info);
    val_00000.npy ...       documents are joined with EOS after each document

Two passes: (1) tokenize in source order into one raw file per split (ordered results keep the output a pure
function of the inputs, whatever the process count); (2) write the documents in a seeded random order into
fixed-size shards. The shuffle is global over documents but only needs the per-document lengths in memory.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from fsutil import atomic_dir, exclusive_lock
from fsutil.progress import Progress

from .sources import Source, document_is_val
from .tokenizer import TokenizerMeta, load_meta, load_processor, model_path

FORMAT = "ebt-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PROGRESS_PREFIX = "data: "  # before each plain progress line (fsutil/progress.py), on stderr
_BATCH_BYTES = 1 << 18  # documents per task: big enough to amortise IPC, small enough to keep workers busy

_worker_state: dict[str, Any] = {}


def shard_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"vocab size {vocab_size} does not fit shard dtype {dtype.name} "
                         f"(holds at most {np.iinfo(dtype).max + 1} ids)")
    return dtype


def shards_key(source: Source, meta: TokenizerMeta, *, val_fraction: float, seed: int, shard_tokens: int,
               dtype: np.dtype) -> str:
    """Everything that determines the shard bytes; equal keys mean a re-run would be a no-op."""
    blob = json.dumps({"format": FORMAT, "source": source.fingerprint(), "tokenizer": meta.model_sha256,
                       "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
                       "dtype": dtype.name}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(shards_dir: str) -> dict[str, Any] | None:
    path = os.path.join(shards_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _brief_source(summary: Any) -> str:
    if not isinstance(summary, dict):
        return repr(summary)
    kind = summary.get("kind")
    if kind == "files":
        return f"{summary.get('spec')!r} ({summary.get('files')} files)"
    if kind == "embedded":
        return f"embedded ({summary.get('files')} files, {summary.get('bytes')} bytes)"
    return f"{kind}:{summary.get('path')}"


def shard_differences(manifest: dict[str, Any], source: Source, *, vocab_size: int, tokenizer_sha256: str | None,
                      val_fraction: float, seed: int, shard_tokens: int, dtype: np.dtype) -> list[str]:
    """What differs between the inputs a shard directory was made from and these ones, as "X in the shards, Y now"
    phrases (`tokenizer_sha256` None: the tokenizer is not trained yet, so only its size can be compared)."""
    made = manifest.get("tokenizer", {})
    out = []
    if made.get("vocab_size") != vocab_size:
        out.append(f"tokenizer vocab size {made.get('vocab_size')} in the shards, {vocab_size} now")
    if tokenizer_sha256 is not None and made.get("sha256") != tokenizer_sha256:
        out.append(f"tokenizer hash {str(made.get('sha256'))[:12]} in the shards, {tokenizer_sha256[:12]} now")
    if manifest.get("source_fingerprint") != source.fingerprint():
        there, here = _brief_source(manifest.get("sources")), _brief_source(source.summary())
        out.append(f"source {there} in the shards, {here} now" if there != here
                   else f"source {here}: its files changed (size or modification time)")
    for label, key, here in (("val_fraction", "val_fraction", val_fraction), ("shuffle seed", "shuffle_seed", seed),
                             ("shard_tokens", "shard_tokens", shard_tokens), ("dtype", "dtype", dtype.name)):
        if manifest.get(key) != here:
            out.append(f"{label} {manifest.get(key)!r} in the shards, {here!r} now")
    return out


def mismatch_message(out_dir: str, manifest: dict[str, Any], differences: list[str]) -> str:
    made_with = manifest.get("tokenizer", {}).get("path")
    what = "; ".join(differences) or "their key differs"
    return (f"output directory {out_dir!r} holds shards of other inputs ({what}); they were made with the "
            f"tokenizer {made_with}. To keep them, write these shards to another directory (--out or "
            "data.shards_dir), or use the tokenizer and settings they were made with")


@contextlib.contextmanager
def dir_lock(path: str, what: str = "output") -> Iterator[None]:
    """Exclusive lock next to `path`, so ranks (or users) racing to prepare the same output wait, not clash.

    Nothing is left behind (fsutil.exclusive_lock's leave_nothing): the holder deletes `<path>.lock` before
    unlocking it, and directories made only to hold the lock are removed again when they are still empty, e.g.
    after a bad input. Callers take it only to write (prepared data is read without it), so a lock that cannot be
    made means `what` cannot be written either: one line naming the directory (a read-only cache on a cluster's
    shared filesystem, say), not filelock's traceback.
    """
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(exclusive_lock(os.path.abspath(path).rstrip("/") + ".lock", leave_nothing=True))
    except OSError as error:  # EROFS, EACCES: on creating a parent directory or the lock file
        where = os.path.dirname(error.filename) if error.filename else os.path.dirname(os.path.abspath(path))
        raise ValueError(f"{what} {path} must be written, but {where} cannot be written to "
                         f"({error.strerror or error}): prepare the data where it is writable (ebt data prepare) "
                         "or point data.cache_dir (--cache-dir, --out) at a writable directory") from None
    with stack:
        yield


def _init_worker(tokenizer_dir: str, eos_id: int, dtype: str, val_fraction: float) -> None:
    _worker_state.update(sp=load_processor(tokenizer_dir), eos=eos_id, dtype=np.dtype(dtype), val=val_fraction)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (tokens of all docs, each followed by EOS; per-doc lengths incl. EOS; per-doc is-val flags)."""
    state = _worker_state
    ids = state["sp"].encode(texts)
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=state["dtype"])
    pos = 0
    for doc in ids:
        tokens[pos:pos + len(doc)] = doc
        tokens[pos + len(doc)] = state["eos"]
        pos += len(doc) + 1
    is_val = np.fromiter((document_is_val(t, state["val"]) for t in texts), dtype=bool, count=len(texts))
    return tokens, lengths, is_val


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(documents: Iterator[str], num_proc: int, init_args: tuple) -> Iterator[tuple]:
    """Ordered parallel map with bounded look-ahead (Pool.imap would read the whole source into memory)."""
    if num_proc <= 1:
        _init_worker(*init_args)
        for batch in _batches(documents):
            yield _encode_batch(batch)
        return
    with mp.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for batch in _batches(documents):
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 4 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_shards(source: Source, tokenizer_dir: str, out_dir: str, *, val_fraction: float = 0.02,
                   seed: int = 0, num_proc: int = 2, shard_tokens: int = 1 << 25, dtype: str = "auto",
                   force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write shards for `source` into `out_dir` unless an identical set is already there; return the manifest."""
    meta = load_meta(tokenizer_dir)
    np_dtype = shard_dtype(meta.vocab_size, dtype)
    if shard_tokens < 2:
        raise ValueError(f"shard_tokens must be at least 2, got {shard_tokens}")
    key = shards_key(source, meta, val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens,
                     dtype=np_dtype)
    out_dir = os.path.abspath(out_dir)
    # The manifest appears together with complete shards (atomic_dir), so a matching one means nothing is to be
    # written: return without the lock, which a read-only cache could not hold.
    existing = read_manifest(out_dir)
    if existing is not None and existing.get("key") == key:
        return existing
    with dir_lock(out_dir, "shard directory"):
        existing = read_manifest(out_dir)
        if existing is not None and existing.get("key") == key:
            return existing  # idempotent re-run
        if os.path.exists(out_dir):
            if existing is None and os.listdir(out_dir):
                raise ValueError(f"output directory {out_dir!r} exists and is not a shard directory")
            if existing is not None and not force:
                raise ValueError(mismatch_message(out_dir, existing, shard_differences(
                    existing, source, vocab_size=meta.vocab_size, tokenizer_sha256=meta.model_sha256,
                    val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens, dtype=np_dtype)))
        # The manifest becomes visible together with complete shards: all of it is written into a temp dir that
        # replaces out_dir at the end. Its fixed name (the lock excludes other writers) lets the next run clear
        # what an interrupted one left.
        with atomic_dir(out_dir, staging=f".{os.path.basename(out_dir)}.partial") as partial:
            manifest = _write(source, tokenizer_dir, meta, str(partial), key=key, val_fraction=val_fraction,
                              seed=seed, num_proc=num_proc, shard_tokens=shard_tokens, dtype=np_dtype,
                              progress=progress)
    return manifest


def _write(source: Source, tokenizer_dir: str, meta: TokenizerMeta, work: str, *, key: str,
           val_fraction: float, seed: int, num_proc: int, shard_tokens: int, dtype: np.dtype,
           progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    raw = {split: open(os.path.join(work, f"raw_{split}.bin"), "wb") for split in SPLITS}
    lengths: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    init_args = (tokenizer_dir, meta.eos_id, dtype.name, val_fraction)
    # Token counts jump by a batch of documents at a time and the total is unknown: plain lines come by time.
    display = Progress(enabled=progress, prefix=PROGRESS_PREFIX, transient=True).__enter__()
    bar = display.add("tokenize", unit="tok", si=True, every=0)
    try:
        for tokens, doc_lengths, is_val in _encoded(source.documents(), num_proc, init_args):
            ends = np.cumsum(doc_lengths)
            starts = ends - doc_lengths
            for split, mask in (("train", ~is_val), ("val", is_val)):
                if mask.any():
                    picked = np.concatenate([tokens[s:e] for s, e in zip(starts[mask], ends[mask], strict=True)])
                    raw[split].write(picked.tobytes())
                    lengths[split].append(doc_lengths[mask])
            display.advance(bar, len(tokens))
    finally:
        display.finish(bar)
        display.__exit__(None, None, None)
        for handle in raw.values():
            handle.close()
    tokenize_s = time.perf_counter() - start

    splits: dict[str, Any] = {}
    for index, split in enumerate(SPLITS):
        doc_lengths = np.concatenate(lengths[split]) if lengths[split] else np.zeros(0, np.int64)
        splits[split] = _write_split(work, split, doc_lengths, dtype, shard_tokens,
                                     np.random.default_rng([seed, index]), progress)
        os.unlink(os.path.join(work, f"raw_{split}.bin"))
    if splits["train"]["documents"] == 0 and splits["val"]["documents"]:  # the split is by whole documents
        raise ValueError(f"data.source {_brief_source(source.summary())} leaves the 'train' split empty: "
                         f"val_fraction={val_fraction} put all {splits['val']['documents']} of its document(s) in "
                         "'val'; give the source more documents (several .txt files, or a .jsonl with one document "
                         "per line) or a smaller data.val_fraction (--val-fraction)")
    if splits["train"]["documents"] == 0:
        raise ValueError(f"source {source.name!r} is empty after filtering: no training documents "
                         f"(val_fraction={val_fraction})")
    manifest = {
        "format": FORMAT, "key": key, "dtype": dtype.name, "eos_id": meta.eos_id,
        "tokenizer": {"path": os.path.abspath(model_path(tokenizer_dir)), "sha256": meta.model_sha256,
                      "vocab_size": meta.vocab_size},
        "sources": source.summary(), "source_fingerprint": source.fingerprint(),
        "val_fraction": val_fraction, "shuffle_seed": seed, "shard_tokens": shard_tokens,
        "splits": splits, "seconds": {"tokenize": round(tokenize_s, 3),
                                      "total": round(time.perf_counter() - start, 3)},
    }
    with open(os.path.join(work, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    return manifest


def _write_split(work: str, split: str, doc_lengths: np.ndarray, dtype: np.dtype, shard_tokens: int,
                 rng: np.random.Generator, progress: bool) -> dict[str, Any]:
    total = int(doc_lengths.sum())
    info: dict[str, Any] = {"documents": int(len(doc_lengths)), "tokens": total, "shards": []}
    if total == 0:
        return info
    raw = np.memmap(os.path.join(work, f"raw_{split}.bin"), dtype=dtype, mode="r")
    ends = np.cumsum(doc_lengths)
    starts = ends - doc_lengths
    order = rng.permutation(len(doc_lengths))
    doc_iter = iter(order)
    carry: np.ndarray | None = None  # tail of a document that spilled over a shard boundary
    written = 0
    with Progress(enabled=progress, prefix=PROGRESS_PREFIX, transient=True) as display:
        bar = display.add(f"write {split}", total, unit="tok", si=True)
        while written < total:
            size = min(shard_tokens, total - written)
            name = f"{split}_{len(info['shards']):05d}.npy"
            out = np.lib.format.open_memmap(os.path.join(work, name), mode="w+", dtype=dtype, shape=(size,))
            pos = 0
            while pos < size:
                if carry is None:
                    doc = next(doc_iter)
                    carry = raw[starts[doc]:ends[doc]]
                take = min(len(carry), size - pos)
                out[pos:pos + take] = carry[:take]
                carry = carry[take:] if take < len(carry) else None
                pos += take
            out.flush()
            del out
            info["shards"].append({"file": name, "tokens": size})
            written += size
            display.advance(bar, size)
    del raw
    return info
