"""Stream mode: tokenize on the fly from any source, no pre-tokenized shards.

Each rank reads its own share of documents (`Source.rank_documents`), keeps the split's documents (content
hash), tokenizes them, appends EOS and packs them into windows of context+1 tokens (stride context, as in the
shard loader). There is no shuffle buffer: shuffle buffers make resume inexact (examples lost and repeated).

Resume state per rank: (epoch, index of the next document in this rank's split stream, leftover tokens that
were tokenized but not yet yielded). With DataLoader workers, worker w tokenizes the documents whose index
(relative to where this iterator started) is congruent to w mod num_workers; torch returns worker outputs
round-robin in submission order, so the main process sees documents in stream order, and the state is
independent of the worker count. Documents prefetched but not yet packed are simply re-read after a resume.
The token buffers are per rank, so the world size cannot change on resume (clear error).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .sources import Source, document_is_val
from .tokenizer import load_processor


def _split_documents(source: Source, rank: int, world_size: int, split: str, val_fraction: float) -> Iterator[str]:
    want_val = split == "val"
    for text in source.rank_documents(rank, world_size):
        if document_is_val(text, val_fraction) == want_val:
            yield text


def _identity(item: Any) -> Any:
    return item


class _TokenizedDocuments(IterableDataset):
    """Yields (epoch, next document index, tokens + EOS) for this rank's split stream, forever."""

    def __init__(self, source: Source, tokenizer_dir: str, eos_id: int, *, rank: int, world_size: int, split: str,
                 val_fraction: float, epoch: int, doc: int, endless: bool = True) -> None:
        self.source, self.tokenizer_dir, self.eos_id = source, tokenizer_dir, eos_id
        self.rank, self.world_size, self.split, self.val_fraction = rank, world_size, split, val_fraction
        self.epoch, self.doc, self.endless = epoch, doc, endless

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        processor = load_processor(self.tokenizer_dir)
        epoch, start = self.epoch, self.doc
        relative = 0  # documents since this iterator started; decides which worker tokenizes which
        while True:
            docs = _split_documents(self.source, self.rank, self.world_size, self.split, self.val_fraction)
            for index, text in enumerate(itertools.islice(docs, start, None), start=start):
                if relative % workers == worker:
                    tokens = np.asarray(processor.encode(text) + [self.eos_id], dtype=np.int64)
                    yield epoch, index + 1, tokens
                relative += 1
            if not self.endless:
                return
            epoch, start = epoch + 1, 0


@dataclass
class _StreamPosition:
    epoch: int = 0
    doc: int = 0
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _stream_batches(documents: Iterator[tuple[int, int, np.ndarray]], position: _StreamPosition, *,
                    context_length: int, batch_size: int) -> Iterator[torch.Tensor]:
    # Free function sharing only `position` with the loader (no reference cycle: dropping the loader stops
    # the workers at once). The position is committed only when a batch is handed out.
    length = context_length
    buffer, epoch, doc = position.buffer, position.epoch, position.doc
    while True:
        rows = []
        while len(rows) < batch_size:
            while len(buffer) < length + 1:
                epoch, doc, tokens = next(documents)
                buffer = np.concatenate([buffer, tokens])
            rows.append(buffer[:length + 1])
            buffer = buffer[length:]
        position.epoch, position.doc, position.buffer = epoch, doc, buffer.copy()
        yield torch.from_numpy(np.stack(rows))


class StreamLoader:
    """Yields LongTensor[micro_batch_size, context_length + 1] forever from a tokenize-on-the-fly stream."""

    def __init__(self, source: Source, tokenizer_dir: str, *, eos_id: int, tokenizer_sha256: str, split: str,
                 val_fraction: float, context_length: int, micro_batch_size: int, rank: int, world_size: int,
                 num_workers: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.source, self.tokenizer_dir, self.eos_id = source, tokenizer_dir, eos_id
        self.tokenizer_sha256 = tokenizer_sha256
        self.split, self.val_fraction = split, val_fraction
        self.context_length, self.batch_size = context_length, micro_batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.position = _StreamPosition()
        self._iterator: Iterator[torch.Tensor] | None = None
        self._checked = False

    def state_dict(self) -> dict[str, Any]:
        """Per rank (the token buffer is this rank's): save every rank's copy."""
        pos = self.position
        return {"kind": "stream", "epoch": pos.epoch, "doc": pos.doc, "buffer": pos.buffer.tolist(),
                "rank": self.rank, "world_size": self.world_size, "context_length": self.context_length,
                "split": self.split, "source": self.source.fingerprint(), "tokenizer": self.tokenizer_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stream":
            raise ValueError(f"data loader state is of kind {state.get('kind')!r}, this loader streams")
        if state["world_size"] != self.world_size:
            raise ValueError(f"data loader state was saved with world size {state['world_size']} but this run has "
                             f"{self.world_size}; stream mode cannot reshard its per-rank token buffers "
                             "(resume with the old world size, or use mode=shards)")
        for key, mine in (("rank", self.rank), ("context_length", self.context_length), ("split", self.split),
                          ("source", self.source.fingerprint()), ("tokenizer", self.tokenizer_sha256)):
            if state[key] != mine:
                raise ValueError(f"data loader state has {key}={str(state[key])[:16]!r} but this run has "
                                 f"{str(mine)[:16]!r}")
        self.close()
        self.position = _StreamPosition(int(state["epoch"]), int(state["doc"]),
                                        np.asarray(state["buffer"], dtype=np.int64))

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._check_nonempty()
            self._iterator = _stream_batches(self._documents(), self.position,
                                             context_length=self.context_length, batch_size=self.batch_size)
        return next(self._iterator)

    def close(self) -> None:
        """Stop DataLoader workers now (also happens when the loader is dropped)."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None

    def _check_nonempty(self) -> None:
        # Checked here, in the main process, so the user sees one line instead of a worker traceback.
        if not self._checked:
            docs = _split_documents(self.source, self.rank, self.world_size, self.split, self.val_fraction)
            if next(docs, None) is None:
                raise ValueError(f"rank {self.rank}/{self.world_size} gets no {self.split!r} documents from "
                                 f"source {self.source.name!r}")
            self._checked = True

    def _documents(self) -> Iterator[tuple[int, int, np.ndarray]]:
        dataset = _TokenizedDocuments(self.source, self.tokenizer_dir, self.eos_id, rank=self.rank,
                                      world_size=self.world_size, split=self.split,
                                      val_fraction=self.val_fraction, epoch=self.position.epoch, doc=self.position.doc)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                               prefetch_factor=8, persistent_workers=False))


class StreamEvalLoader:
    """One pass over this rank's split documents, packed into windows; the last batch may be short."""

    def __init__(self, source: Source, tokenizer_dir: str, *, eos_id: int, split: str, val_fraction: float,
                 context_length: int, micro_batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset = _TokenizedDocuments(source, tokenizer_dir, eos_id, rank=rank, world_size=world_size,
                                           split=split, val_fraction=val_fraction, epoch=0, doc=0, endless=False)
        self.context_length, self.batch_size = context_length, micro_batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        length = self.context_length
        buffer = np.zeros(0, dtype=np.int64)
        rows: list[np.ndarray] = []
        for _epoch, _doc, tokens in self.dataset:
            buffer = np.concatenate([buffer, tokens])
            while len(buffer) >= length + 1:
                rows.append(buffer[:length + 1])
                buffer = buffer[length:]
                if len(rows) == self.batch_size:
                    yield torch.from_numpy(np.stack(rows))
                    rows = []
        if rows:
            yield torch.from_numpy(np.stack(rows))
