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
    check_token_range(name, tokens, vocab_size)


def check_token_range(name: str, tokens: torch.Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size), without reading the tokens on the host.

    Reading min/max back (`int(tokens.min())`) would stall a GPU once per call; a device-side assert queues the
    check instead. On CPU it is evaluated at once, and a failure is reported as the ValueError naming the first
    offending id; on CUDA a bad id fails at the next synchronisation as a device-side assert. Training batches
    are validated on the host by the loader (data_pipeline.loader.check_token_batch) before they reach the
    device, so this is the direct API's guard.
    """
    inside = ((tokens >= 0) & (tokens < vocab_size)).all()
    message = f"{name}: a token id is outside the vocabulary [0, {vocab_size})"
    try:
        torch._assert_async(inside, message)
    except RuntimeError:
        low, high = int(tokens.min()), int(tokens.max())  # the failure path only: name the id
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})") from None


def check_candidates(name: str, candidates: torch.Tensor, batch: int, length: int, vocab_size: int) -> None:
    if not isinstance(candidates, torch.Tensor) or not candidates.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor")
    expected = (batch, length, vocab_size)
    if tuple(candidates.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(candidates.shape)}")


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
