"""A replay buffer of thinking trajectories: a training batch is extended by buffered sequences that continue
from where earlier batches left their candidates (longer effective chains at the cost of K steps per batch).

As in the reference (model/replay_buffer.py): replayed sequences are APPENDED to the fresh batch (no fresh
sequence is dropped), only fresh sequences are pushed (no chain is duplicated), and the oldest entries leave
first once the buffer is full.

The buffer is part of training state, so `state_dict()` carries its contents and its sampling generator.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, fraction: float, seed: int = 0) -> None:
        self.capacity = capacity
        self.fraction = fraction
        self.tokens: torch.Tensor | None = None  # [capacity, S+1]
        self.logits: torch.Tensor | None = None  # [capacity, S, V]
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
        replayed = self.logits[picked].to(init_logits.device, init_logits.dtype)
        return tokens, torch.cat((init_logits, replayed), dim=0), count

    @torch.no_grad()
    def push(self, tokens: torch.Tensor, final_logits: torch.Tensor) -> None:
        """Store fresh sequences with their final candidates; the oldest entries are overwritten when full."""
        if self.tokens is None or self.tokens.shape[1:] != tokens.shape[1:]:
            self.tokens = tokens.new_zeros((self.capacity, *tokens.shape[1:]))
            self.logits = final_logits.new_zeros((self.capacity, *final_logits.shape[1:]))
            self.size = self.cursor = 0
        for row in range(tokens.shape[0]):
            self.tokens[self.cursor] = tokens[row]
            self.logits[self.cursor] = final_logits[row].detach()
            self.cursor = (self.cursor + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "logits": self.logits,
            "size": self.size,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.logits = state["tokens"], state["logits"]
        self.size, self.cursor = int(state["size"]), int(state["cursor"])
        self.generator.set_state(state["generator"])
