"""What differs per model kind: the loss call, the metrics it reports, extra state, and what it can't run on.

The Trainer owns the loop and bookkeeping, its Strategy (launch/strategies.py) the parallelism; a TrainModule
only knows its model. For both kinds one call of the (possibly DDP/DeepSpeed-wrapped) module computes the whole
loss: for an EBT that call runs every MCMC step, with the inner `autograd.grad(create_graph=True)` w.r.t. the
candidates inside it, so the trainer's single backward afterwards carries the second-order terms and DDP reduces
each gradient exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ebt import ModelConfig
from ebt.flops import train_flops_per_token


class TrainModule:
    kind = "base"
    # Per-step training values that exact resume must reproduce bit for bit.
    metric_keys: tuple[str, ...] = ("loss", "ppl")

    def __init__(self, model_cfg: ModelConfig, seed: int = 0) -> None:
        self.model_cfg = model_cfg
        self.seed = seed

    def loss(self, wrapped: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        kwargs.pop("step", None)  # the training step: only kinds with per-sequence noise use it
        loss, metrics = wrapped(tokens, **kwargs)
        return loss, metrics

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> tuple[float, int]:
        """(summed NLL, token count) of tokens [B, S+1] over the targets that are not ignore_index.

        A sum and a count, so that validation can be token-weighted across batches and ranks (a mean of
        batch means weighs a short tail batch like a full one). The model's mean CE is over the same
        targets, so mean x count is the sum."""
        count = self._targets(tokens)
        if count == 0:
            return 0.0, 0
        loss, _ = model.loss(tokens)
        return float(loss) * count, count

    def _targets(self, tokens: torch.Tensor) -> int:
        return int((tokens[:, 1:] != self.model_cfg.ignore_index).sum())

    def flops_per_token(self) -> float:
        return train_flops_per_token(self.model_cfg)

    def state_dict(self, model: nn.Module) -> dict:
        return {}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        return None


class TransformerTrainModule(TrainModule):
    kind = "transformer"


# ---- sequence-keyed starts: a counter-based draw on the device --------------------------------------------
# All hashing is 32-bit words held in int64 tensors. A multiplier M >= 2**31 is applied as M - 2**32 (the same
# product mod 2**32), so every product stays inside int64: no overflow anywhere (signed overflow is undefined in
# the C++ kernels), hence the same integers on every device.
_MASK32 = 0xFFFFFFFF
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B  # Chris Wellons' "lowbias32" 32-bit finaliser
_MIX_1_I64, _MIX_2_I64 = _MIX_1, _MIX_2 - 2**32
_TAG = 0x45425453  # "EBTS": this draw's domain
# Pairs of normals per chunk: bounds the int64 temporaries (2**16 pairs keep a CPU chunk in cache; on a GPU the
# launches are what cost, so chunks are larger). Chunking never changes a value: every draw is elementwise.
_CHUNK = {"cpu": 2**16, "cuda": 2**24}


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of each 32-bit word of int64 `x`, in place."""
    x.bitwise_xor_(x >> 16).mul_(_MIX_1_I64).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(_MIX_2_I64).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _mix_int(x: int) -> int:
    """_mix_ of one Python int (its low 32 bits)."""
    x &= _MASK32
    x = ((x ^ (x >> 16)) * _MIX_1) & _MASK32
    x = ((x ^ (x >> 15)) * _MIX_2) & _MASK32
    return x ^ (x >> 16)


def _sequence_keys(tokens: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """A 32-bit key [B, 1] per sequence from (seed, step, its tokens), on the tokens' device.

    Each position's word mixes (key of seed and step, position) with the token there, and the words are summed
    (mod 2**32) and mixed again: order-dependent, and computed for every sequence at once."""
    base = _TAG
    for word in (seed, seed >> 32, step, step >> 32):  # Python ints, negatives in two's complement
        base = _mix_int(base ^ (word & _MASK32))
    length = tokens.shape[1]
    positions = _mix_(torch.arange(length, dtype=torch.int64, device=tokens.device).add_(base).bitwise_and_(_MASK32))
    words = _mix_(tokens.to(torch.int64).bitwise_and(_MASK32).bitwise_xor_(positions))
    return _mix_(words.sum(dim=1, keepdim=True).bitwise_and_(_MASK32).bitwise_xor_(_mix_int(base ^ length)))


def sequence_keyed_starts(tokens: torch.Tensor, seed: int, step: int, vocab_size: int, std: float,
                          dtype: torch.dtype) -> torch.Tensor:
    """Initial candidate logits [B, S, V] for tokens [B, S+1]: N(0, std^2) noise keyed by (seed, step, that
    sequence's tokens).

    A sequence thus starts from the same noise whichever rank, micro-batch or batch position it lands in, so
    an EBT run depends on the global batch, not on the world size or the accumulation split. (Drawing from
    each rank's RNG stream made 1-rank and 2-rank runs differ.)

    Drawn on the tokens' device without a host round trip (an earlier version copied the tokens to the host and
    seeded a generator per sequence from a blake2b digest: a sync and B generator set-ups per micro-batch), as a
    counter-based draw: the sequence's 32-bit key (_sequence_keys) and a pre-mixed counter per pair of outputs
    give two 32-bit words per pair (lowbias32), those two uniforms and a sign, and Box-Muller two normals. The
    integers are exact everywhere, and the transform runs in float64 (log and cos within an ulp of double on
    CPU and CUDA alike, the rest correctly rounded) before rounding to `dtype`, so CPU and CUDA give the same
    numbers (barring a rare last-bit rounding tie).
    """
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    device = tokens.device
    keys = _sequence_keys(tokens.detach(), seed, step)
    total = length * vocab_size
    pairs = (total + 1) // 2
    out = torch.empty(batch, 2 * pairs, dtype=dtype, device=device)
    budget = _CHUNK.get(device.type, _CHUNK["cuda"])
    pair_chunk = min(pairs, budget)
    row_chunk = max(1, budget // pair_chunk)
    for first in range(0, pairs, pair_chunk):
        last = min(first + pair_chunk, pairs)
        # Counters are mixed before the key is added: with keys added to raw counters, two sequences whose keys
        # differ by less than the counter range would draw shifted copies of one stream.
        counters = torch.arange(first, last, dtype=torch.int64, device=device).mul_(2)
        radius_counters = _mix_(counters.clone())
        angle_counters = _mix_(counters.add_(1))
        for row in range(0, batch, row_chunk):
            key = keys[row:row + row_chunk]
            radius_bits = _mix_((radius_counters + key).bitwise_and_(_MASK32))
            angle_bits = _mix_((angle_counters + key).bitwise_and_(_MASK32))
            # 25 bits -> a signed w in [-2**24, 2**24): |w + 1/2| / 2**24 is uniform on (0, 1) (24 bits, exact in
            # float64) and the sign of w a fair coin, independent of it. r = sqrt(-2 ln u) carries that sign.
            signed = (radius_bits >> 7).sub_(2**24).to(torch.float64).add_(0.5)
            radius = signed.abs().mul_(2.0**-24).log_().mul_(-2.0).sqrt_().copysign_(signed)
            # theta uniform on [0, pi) from 24 bits; with the random sign of r, (r cos, r sin) is Box-Muller's
            # pair for an angle uniform on [0, 2 pi). sin >= 0 here, so it follows from cos by a sqrt (correctly
            # rounded everywhere): one transcendental fewer.
            cos = (angle_bits >> 8).to(torch.float64).mul_(math.pi * 2.0**-24).cos_()
            sin = (1.0 - cos.square()).sqrt_()  # |cos| <= 1, so the rounded 1 - cos^2 >= 0
            rows = slice(row, row + key.shape[0])
            out[rows, first:last] = cos.mul_(radius)
            out[rows, pairs + first:pairs + last] = sin.mul_(radius)
    return out[:, :total].reshape(batch, length, vocab_size).mul_(std)


# Validation starts use this seed whatever trainer.seed is, so runs of different seeds are validated from the
# same starts, and `ebt eval --seed 0` (its default) reproduces the trainer's val_loss.
EVAL_START_SEED = 0


def eval_starts(tokens: torch.Tensor, seed: int, sample: int, vocab_size: int, std: float,
                dtype: torch.dtype) -> torch.Tensor:
    """Initial candidates of sample `sample` for evaluation: keyed by (seed, sample, the sequence's tokens).

    Used by the trainer's validation (sample 0) and by `ebt eval` (sample m of a cell with several chains),
    so both score a sequence from the same start wherever it lands. Training keys its starts by step >= 0;
    evaluation takes the keys -1, -2, ... so the two never share a start.
    """
    return sequence_keyed_starts(tokens, seed, -1 - sample, vocab_size, std, dtype)


class EBTTrainModule(TrainModule):
    kind = "ebt"

    def loss(self, wrapped: nn.Module, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        step = kwargs.pop("step", None)
        cfg = self.model_cfg
        if step is not None and "init_logits" not in kwargs and cfg.init_logit_std > 0:
            kwargs["init_logits"] = sequence_keyed_starts(tokens, self.seed, step, cfg.vocab_size,
                                                          cfg.init_logit_std, torch.float32)
        return super().loss(wrapped, tokens, **kwargs)

    @property
    def metric_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        # Every step a forward can run (repeated landscapes add steps); rows omit those no micro-batch ran.
        steps = tuple(f"ce_step_{k}" for k in range(self.model_cfg.max_executed_steps))
        return ("loss", "ppl", "alpha", "energy_gap") + steps

    @torch.no_grad()
    def eval_loss(self, model: nn.Module, tokens: torch.Tensor) -> tuple[float, int]:
        # Validation reports the final-step CE (what generation would use), not the mean over steps. The MCMC
        # loop turns gradients on for the candidates itself; no_grad only drops the parameter graph. Starts
        # are keyed by sequence (eval_starts), so a sequence's loss does not depend on its rank or batch.
        cfg = self.model_cfg
        count = self._targets(tokens)
        if count == 0:
            return 0.0, 0
        dtype = model.alpha_raw.dtype
        if cfg.init_logit_std > 0:
            starts = eval_starts(tokens, EVAL_START_SEED, 0, cfg.vocab_size, cfg.init_logit_std, dtype)
        else:  # zeros, as the model would draw them, without touching any RNG stream (CUDA's included)
            starts = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, cfg.vocab_size, dtype=dtype,
                                 device=tokens.device)
        _, metrics = model.loss(tokens, init_logits=starts)
        return float(metrics.get("ce", metrics["loss"])) * count, count

    def state_dict(self, model: nn.Module) -> dict:
        buffer = getattr(model, "replay_buffer", None)
        return {"replay_buffer": buffer.state_dict() if buffer is not None else None}

    def load_state_dict(self, model: nn.Module, state: dict) -> None:
        buffer = getattr(model, "replay_buffer", None)
        saved = state.get("replay_buffer")
        if buffer is not None and saved is not None:
            buffer.load_state_dict(saved)


def make_train_module(model_cfg: ModelConfig, seed: int = 0) -> TrainModule:
    if model_cfg.kind == "ebt":
        return EBTTrainModule(model_cfg, seed)
    return TransformerTrainModule(model_cfg, seed)
