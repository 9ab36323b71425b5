"""Pure index arithmetic for the shard loader: which windows a rank reads, given (seed, epoch, offset).

Each epoch draws a seeded permutation of all windows. The epoch is consumed in global steps of `world_size`
windows: rank r takes perm[offset + r], perm[offset + W + r], ... so ranks are disjoint, stay in lockstep, and
the position (epoch, offset) is the SAME on every rank. A remainder of fewer than W windows is skipped at the
end of an epoch (a different remainder each epoch, since the permutation changes).

Because the position is global, resuming with another world size is well defined: the new ranks split the
rest of the same permutation (documented reshard, tested).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_permutation(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def advance(n_windows: int, world_size: int, epoch: int, offset: int, samples: int) -> tuple[int, int]:
    """Position after each rank has taken `samples` more windows (mirrors `rank_batches`)."""
    while samples > 0:
        remaining = (n_windows - offset) // world_size
        if remaining == 0:
            epoch, offset = epoch + 1, 0
            continue
        take = min(samples, remaining)
        offset += take * world_size
        samples -= take
    if (n_windows - offset) // world_size == 0:  # a finished epoch reads as the start of the next one
        epoch, offset = epoch + 1, 0
    return epoch, offset


def rank_batches(seed: int, n_windows: int, world_size: int, rank: int, epoch: int, offset: int,
                 batch_size: int) -> Iterator[np.ndarray]:
    """Batches of window indices for `rank`, forever, starting at (epoch, offset)."""
    if n_windows < world_size:
        raise ValueError(f"{n_windows} windows cannot be split over {world_size} ranks")
    pending = np.zeros(0, dtype=np.int64)
    while True:
        while len(pending) < batch_size:
            end = offset + world_size * ((n_windows - offset) // world_size)
            mine = epoch_permutation(seed, epoch, n_windows)[offset + rank:end:world_size]
            pending = np.concatenate([pending, mine])
            epoch, offset = epoch + 1, 0
        yield pending[:batch_size]
        pending = pending[batch_size:]
