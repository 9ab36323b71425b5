"""A replay buffer of thinking trajectories: some sequences of a batch continue from where earlier batches left
their candidates instead of starting from noise (longer effective chains at the cost of K steps per batch).

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

    def mix(self, tokens: torch.Tensor, init_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Replace the last rows of the batch by buffered (tokens, logits) pairs; returns the count replaced."""
        count = min(int(self.fraction * tokens.shape[0]), self.size)
        if count == 0 or self.tokens.shape[1:] != tokens.shape[1:]:
            return tokens, init_logits, 0
        picked = torch.randperm(self.size, generator=self.generator)[:count].to(tokens.device)
        tokens = torch.cat((tokens[:-count], self.tokens[picked]), dim=0)
        init_logits = torch.cat((init_logits[:-count], self.logits[picked].to(init_logits.dtype)), dim=0)
        return tokens, init_logits, count

    @torch.no_grad()
    def push(self, tokens: torch.Tensor, final_logits: torch.Tensor) -> None:
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
