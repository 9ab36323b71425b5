"""Input checks for the public API: each failure is a ValueError whose message names the argument."""

from __future__ import annotations

import torch


def check_tokens(name: str, tokens: torch.Tensor, vocab_size: int, max_length: int | None = None) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected an integer (Long) tensor, got {getattr(tokens, 'dtype', type(tokens))}")
    if tokens.dim() != 2:
        raise ValueError(f"{name}: expected rank 2 [batch, length], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{name}: empty batch or sequence, shape {tuple(tokens.shape)}")
    if max_length is not None and tokens.shape[1] > max_length:
        raise ValueError(f"{name}: length {tokens.shape[1]} exceeds the model's limit {max_length}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_candidates(name: str, candidates: torch.Tensor, batch: int, length: int, vocab_size: int) -> None:
    if not isinstance(candidates, torch.Tensor) or not candidates.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor")
    expected = (batch, length, vocab_size)
    if tuple(candidates.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(candidates.shape)}")


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
