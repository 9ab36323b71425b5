"""A replay buffer of thinking trajectories: a training batch is extended by buffered sequences that continue
from where earlier batches left their candidates (longer effective chains at the cost of K steps per batch).

As in the reference (model/replay_buffer.py): replayed sequences are APPENDED to the fresh batch (no fresh
sequence is dropped), only fresh sequences are pushed (no chain is duplicated), and the oldest entries leave
first once the buffer is full.

The buffer is part of training state, so `state_dict()` carries its contents and its sampling generator.

Compact form (`top_k` > 0, this project's option; the reference keeps whole logits): a chain's final logits
[S, V] are kept as each position's k largest logits, their vocabulary indices and one tail value, the level
that spreads the remaining probability mass evenly over the other V - k entries. A replayed chain restarts
from logits whose softmax has exactly the stored top-k probabilities and the stored tail mass (up to float
rounding); only how that tail mass is spread is lost. The buffer then holds capacity x S x (k + 1) values and
k indices instead of capacity x S x V values: at the paper ladder's vocabulary (32,768), context 256 and
capacity 512, k = 64 keeps 67 MB per rank (and per checkpoint) instead of 17 GB. What is stored is what is
replayed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, fraction: float, seed: int = 0, top_k: int = 0) -> None:
        self.capacity = capacity
        self.fraction = fraction
        self.top_k = top_k
        self.tokens: torch.Tensor | None = None  # [capacity, S+1]
        self.logits: torch.Tensor | None = None  # [capacity, S, V]; compact: [capacity, S, k + 1] (top-k, tail)
        self.indices: torch.Tensor | None = None  # compact only: [capacity, S, k] int32 vocabulary indices
        self.vocab_size = 0
        self.size = 0
        self.cursor = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def slot(self, chronological: int) -> int:
        """Ring-buffer slot of the entry at `chronological` (0 = the oldest kept)."""
        return (self.cursor - self.size + chronological) % self.capacity

    def mix(
        self, tokens: torch.Tensor, init_logits: torch.Tensor, indices: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Append int(fraction * batch) buffered (tokens, final logits) pairs to the batch (fewer while the
        buffer holds fewer); returns the extended batch and the count appended. `indices` picks them (0 = the
        oldest entry); by default they are drawn without replacement from the buffer's own generator."""
        count = min(int(self.fraction * tokens.shape[0]), self.size)
        if count == 0 or self.tokens.shape[1:] != tokens.shape[1:]:
            return tokens, init_logits, 0
        if indices is None:
            indices = torch.randperm(self.size, generator=self.generator)[:count].tolist()
        elif len(indices) != count or not all(0 <= i < self.size for i in indices):
            raise ValueError(f"replay indices: expected {count} distinct indices in [0, {self.size}), got {indices}")
        picked = torch.tensor([self.slot(i) for i in indices], device=self.tokens.device)
        tokens = torch.cat((tokens, self.tokens[picked].to(tokens.device)), dim=0)
        replayed = self.logits[picked] if self.indices is None else self._expand(picked)
        return tokens, torch.cat((init_logits, replayed.to(init_logits.device, init_logits.dtype)), dim=0), count

    def _expand(self, picked: torch.Tensor) -> torch.Tensor:
        """Logits [n, S, V] of compact entries: the tail level everywhere, the stored top-k at their indices."""
        stored = self.logits[picked]  # [n, S, k + 1]
        top, tail = stored[..., :-1], stored[..., -1:]
        full = tail.expand(*tail.shape[:-1], self.vocab_size).clone()
        return full.scatter_(-1, self.indices[picked].long(), top)

    def _compact(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, S, k + 1] top-k logits then the tail level, [B, S, k] their indices) of logits [B, S, V].

        tail = log(sum of exp over the other V - k) - log(V - k): spread evenly, the others keep their mass."""
        top, index = logits.topk(self.top_k, dim=-1)
        total = torch.logsumexp(logits, dim=-1, keepdim=True)
        # min(.., 0): rounding can put the top's logsumexp a hair above the total's (all mass in the top k), where
        # log1p(-exp(+eps)) would be NaN; at 0 the rest is -inf, caught just below.
        top_share = (torch.logsumexp(top, dim=-1, keepdim=True) - total).clamp(max=0.0)
        rest = total + torch.log1p(-torch.exp(top_share))
        # A tail of no mass (all of it in the top k, to rounding) sits far below them rather than at -inf, whose
        # differences would make the next MCMC step's logits NaN.
        tail = torch.maximum(rest - math.log(logits.shape[-1] - self.top_k), top[..., -1:] - 80.0)
        return torch.cat((top, tail), dim=-1), index.to(torch.int32)

    @torch.no_grad()
    def push(self, tokens: torch.Tensor, final_logits: torch.Tensor) -> None:
        """Store fresh sequences with their final candidates; the oldest entries are overwritten when full."""
        final_logits = final_logits.detach()
        index = None
        if self.top_k:  # < vocab_size: ModelConfig.validate
            self.vocab_size = final_logits.shape[-1]
            final_logits, index = self._compact(final_logits)
        if self.tokens is None or self.tokens.shape[1:] != tokens.shape[1:]:
            self.tokens = tokens.new_zeros((self.capacity, *tokens.shape[1:]))
            self.logits = final_logits.new_zeros((self.capacity, *final_logits.shape[1:]))
            self.indices = None if index is None else index.new_zeros((self.capacity, *index.shape[1:]))
            self.size = self.cursor = 0
        for row in range(tokens.shape[0]):
            self.tokens[self.cursor] = tokens[row]
            self.logits[self.cursor] = final_logits[row]
            if index is not None:
                self.indices[self.cursor] = index[row]
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        state = {
            "tokens": self.tokens,
            "logits": self.logits,
            "size": self.size,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
        }
        if self.top_k:  # absent for whole logits, so checkpoints of the reference's form read as before
            state.update(indices=self.indices, vocab_size=self.vocab_size, top_k=self.top_k)
        return state

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("top_k", 0)) != self.top_k:
            raise ValueError(f"replay buffer: the checkpoint stores top_k={state.get('top_k', 0)}, this model uses "
                             f"replay.top_k={self.top_k}")
        self.tokens, self.logits = state["tokens"], state["logits"]
        self.indices, self.vocab_size = state.get("indices"), int(state.get("vocab_size", 0))
        self.size, self.cursor = int(state["size"]), int(state["cursor"])
        self.generator.set_state(state["generator"])
