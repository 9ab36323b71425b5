"""Shard-mode loaders: an endless, exactly resumable training loader and a finite evaluation loader.

Exact resume with DataLoader workers: the sampler (which windows, in which order) runs in the main process as
pure arithmetic on (seed, epoch, offset); workers only read memmap slices for the index batches they are
handed, and torch's DataLoader returns results in submission order. The position is advanced when a batch is
handed to the caller, never when a worker prefetches, so `state_dict()` is exact whatever the worker count,
and the worker count may change between save and resume. A fresh (non-persistent) DataLoader is started on
each resume, so no worker keeps stale epoch state (the persistent_workers pitfall).

Every batch is validated here, once, on the host (check_token_batch: each id inside the tokenizer's vocabulary)
before it becomes a tensor, so the model need not read the tokens back from the device in each step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import advance, rank_batches
from .shards import PackedShards

_WINDOWS_PER_TASK = 64


def check_token_batch(tokens: np.ndarray, vocab_size: int, where: str) -> np.ndarray:
    """`tokens` unchanged if every id lies in [0, vocab_size); else a ValueError naming the id and the shards.

    Checked on the numpy array (microseconds for a batch): shards written with another tokenizer, or damaged
    ones, are caught before anything reaches the model, which then only keeps a device-side assert."""
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} in {where} is outside the vocabulary [0, {vocab_size}) of the tokenizer "
                         "the shards were made with; the shard directory is damaged: delete it to prepare it again")
    return tokens


def _vocab_size(shards: PackedShards) -> int:
    return int(shards.manifest["tokenizer"]["vocab_size"])


def _read(shards: PackedShards, windows: np.ndarray) -> np.ndarray:
    """Windows [len(windows), L + 1] of `shards`, validated (check_token_batch)."""
    return check_token_batch(shards.read(windows), _vocab_size(shards), repr(shards.dir))


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # several processes share few cores; OpenMP spinning costs 10-40x


class _WindowReader(Dataset):
    def __init__(self, shards: PackedShards) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return self.shards.n_windows

    def __getitem__(self, windows) -> torch.Tensor:  # noqa: ANN001 - [G, B] index array from the sampler
        groups, batch = windows.shape
        return torch.from_numpy(_read(self.shards, windows.reshape(-1))).view(groups, batch, -1)


class _IndexBatches:
    """Iterable handed to DataLoader as its sampler; each item is `group` batches of window indices [G, B].

    Grouping amortises the per-task hand-off between processes, which dominates when a task is only a
    memcpy from a memmap (measured: one batch per task was slower with 2 workers than with none).
    """

    def __init__(self, *args: int, group: int = 1) -> None:
        self.args, self.group = args, group

    def __iter__(self) -> Iterator[Any]:
        batches = rank_batches(*self.args)
        while True:
            yield np.stack([next(batches) for _ in range(self.group)])


@dataclass
class _Position:
    epoch: int = 0
    offset: int = 0


def _shard_batches(shards: PackedShards, position: _Position, *, seed: int, rank: int, world_size: int,
                   batch_size: int, num_workers: int, prefetch_factor: int) -> Iterator[torch.Tensor]:
    # A free function sharing only `position` with the loader: no loader <-> generator reference cycle, so
    # dropping the loader closes the generator (and shuts DataLoader workers down) at once instead of at a
    # later cyclic GC, where worker shutdown waits out its timeouts.
    start = (seed, shards.n_windows, world_size, rank, position.epoch, position.offset, batch_size)
    if num_workers == 0:
        source: Any = (torch.from_numpy(_read(shards, idx)) for idx in rank_batches(*start))
    else:
        sampler = _IndexBatches(*start, group=max(1, _WINDOWS_PER_TASK // batch_size))
        groups = DataLoader(_WindowReader(shards), batch_size=None, sampler=sampler, num_workers=num_workers,
                            worker_init_fn=_one_thread, prefetch_factor=prefetch_factor, persistent_workers=False)
        source = (batch for group in groups for batch in group)
    for batch in source:
        position.epoch, position.offset = advance(shards.n_windows, world_size, position.epoch, position.offset,
                                                  batch_size)
        yield batch


class ShardLoader:
    """Yields LongTensor[micro_batch_size, context_length + 1] forever; see module docstring for resume."""

    def __init__(self, shards: PackedShards, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int = 0, prefetch_factor: int = 4) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shards.n_windows < world_size:
            raise ValueError(f"context length {shards.context_length} leaves only {shards.n_windows} windows in "
                             f"{shards.dir!r}, fewer than the {world_size} ranks")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self.shards = shards
        self.batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.position = _Position()
        self._iterator: Iterator[torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return self.position.epoch

    # -- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Identical on every rank (position is global), so saving rank 0's copy is enough."""
        return {"kind": "shards", "epoch": self.position.epoch, "offset": self.position.offset,
                "seed": self.seed, "world_size": self.world_size, "n_windows": self.shards.n_windows,
                "context_length": self.shards.context_length, "shards_key": self.shards.key,
                "split": self.shards.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise ValueError(f"data loader state is of kind {state.get('kind')!r}, this loader reads shards")
        for key, mine in (("shards_key", self.shards.key), ("context_length", self.shards.context_length),
                          ("seed", self.seed), ("split", self.shards.split)):
            if state[key] != mine:
                raise ValueError(f"data loader state has {key}={state[key]!r} but this run has {mine!r}")
        # A different world size is allowed: the (epoch, offset) position is global (see sampler.py).
        self.close()
        self.position = _Position(int(state["epoch"]), int(state["offset"]))

    # -- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = _shard_batches(self.shards, self.position, seed=self.seed, rank=self.rank,
                                            world_size=self.world_size, batch_size=self.batch_size,
                                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        return next(self._iterator)

    def close(self) -> None:
        """Stop DataLoader workers now (also happens when the loader is dropped)."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None


class ShardEvalLoader:
    """Each window of the split exactly once, split across ranks (window index mod world size), in order.

    `limit` > 0 keeps only the first `limit` windows of the split (before the split across ranks).
    """

    def __init__(self, shards: PackedShards, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 limit: int = 0) -> None:
        self.shards = shards
        self.batch_size = micro_batch_size
        end = min(limit, shards.n_windows) if limit else shards.n_windows
        self.windows = np.arange(rank, end, world_size)

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, len(self.windows), self.batch_size):
            yield torch.from_numpy(_read(self.shards, self.windows[start:start + self.batch_size]))


def global_eval_share(loader: Iterable[torch.Tensor], *, limit: int, rank: int, world_size: int,
                      batch_size: int) -> Iterable[torch.Tensor]:
    """This rank's share of the first `limit` sequences (0: all) that a 1-rank eval loader yields.

    Sequence i of the split goes to rank i mod world_size, in batches of `batch_size` (the last may be short),
    so the ranks together see the same sequences whatever the world size or batch size: what a validation
    number that does not change with the parallelism needs. `loader` must be built for rank 0 of world 1.
    A shard loader is re-indexed without reading the other ranks' windows; any other loader (stream mode,
    whose per-rank document split would pack different windows per world size) is read in full up to
    `limit` and filtered.
    """
    if limit < 0 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need limit >= 0, 0 <= rank < world_size and batch_size >= 1, got {limit}, {rank}, "
                         f"{world_size}, {batch_size}")
    if isinstance(loader, ShardEvalLoader):
        if len(loader.windows) != loader.shards.n_windows:
            raise ValueError("global_eval_share needs the 1-rank loader of the whole split")
        return ShardEvalLoader(loader.shards, micro_batch_size=batch_size, rank=rank, world_size=world_size,
                               limit=limit)
    return _filtered_share(loader, limit, rank, world_size, batch_size)


def _filtered_share(loader: Iterable[torch.Tensor], limit: int, rank: int, world_size: int,
                    batch_size: int) -> Iterator[torch.Tensor]:
    rows: list[torch.Tensor] = []
    index = 0
    for batch in loader:
        for row in batch:
            if limit and index >= limit:
                break
            if index % world_size == rank:
                rows.append(row)
                if len(rows) == batch_size:
                    yield torch.stack(rows)
                    rows = []
            index += 1
        if limit and index >= limit:
            break
    if rows:
        yield torch.stack(rows)
