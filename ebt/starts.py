"""The chains' starting candidates: ONE keyed, counter-based draw of N(0, std^2) logits, on the tokens' device.

Every start the project draws comes from `keyed_normals`: a 32-bit key per row and a counter per output give
the numbers, so a start depends only on its key, never on an RNG stream, a rank, a batch position or what was
drawn before. The keys name what a start belongs to:

- `sequence_keyed_starts` (training, with the step): one key per sequence from (seed, step, all its tokens);
  `eval_starts` (the trainer's validation and `ebt eval`'s grid) is the same draw at steps -1, -2, ...
- `prefix_keyed_starts` (System 2: `think`, `ebt eval --task` / lm-eval scoring, `ebt generate`): one key per
  position from (seed, sample, the tokens up to it), a cumulative prefix hash, so a position's start does not
  depend on the tokens after it or on its batch; `PrefixKeys` extends those keys one token at a time for
  generation, which thus starts position t exactly where `think` over the whole text would.

The model's own default (`ebt.draws.Draws.starts`, the global RNG) is the reference's draw, kept for parity.

All hashing is 32-bit words held in int64 tensors. A multiplier M >= 2**31 is applied as M - 2**32 (the same
product mod 2**32), so every product stays inside int64: no overflow anywhere (signed overflow is undefined in
the C++ kernels), hence the same integers on every device.
"""

from __future__ import annotations

import functools
import math

import torch

_MASK32 = 0xFFFFFFFF
_MIX_1, _MIX_2 = 0x7FEB352D, 0x846CA68B  # Chris Wellons' "lowbias32" 32-bit finaliser
_MIX_1_I64, _MIX_2_I64 = _MIX_1, _MIX_2 - 2**32
_SEQUENCE_TAG = 0x45425453  # "EBTS": sequence-keyed starts (training, validation, `ebt eval`)
_PREFIX_TAG = 0x45425450  # "EBTP": prefix-keyed starts (think, scoring, generation); never a sequence's key
# Pairs of normals per chunk: bounds the int64 temporaries (2**16 pairs keep a CPU chunk in cache; on a GPU the
# launches are what cost, so chunks are larger). Chunking never changes a value: every draw is elementwise.
_CHUNK = {"cpu": 2**16, "cuda": 2**24}

# Validation starts use this seed whatever trainer.seed is, so runs of different seeds are validated from the
# same starts, and `ebt eval --seed 0` (its default) reproduces the trainer's val_loss.
EVAL_START_SEED = 0


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


def _domain_key(tag: int, seed: int, index: int) -> int:
    """The 32-bit key of one stream of starts: (tag, seed, index), negatives in two's complement."""
    base = tag
    for word in (seed, seed >> 32, index, index >> 32):
        base = _mix_int(base ^ (word & _MASK32))
    return base


def _position_words(tokens: torch.Tensor, base: int, first: int = 0) -> torch.Tensor:
    """int64 [B, L]: token t's 32-bit word, mixing (base, its position first + t) with the token there."""
    length = tokens.shape[1]
    positions = torch.arange(first, first + length, dtype=torch.int64, device=tokens.device)
    positions = _mix_(positions.add_(base).bitwise_and_(_MASK32))
    return _mix_(tokens.to(torch.int64).bitwise_and(_MASK32).bitwise_xor_(positions))


def _close(sums: torch.Tensor, base: int, lengths: torch.Tensor | int) -> torch.Tensor:
    """The key of a prefix from its summed words (mod 2**32) and its length: order-dependent, as the words
    carry their positions."""
    if isinstance(lengths, int):
        tail = _mix_int(base ^ lengths)
    else:
        tail = _mix_(lengths.to(torch.int64).bitwise_xor(base).bitwise_and_(_MASK32))
    return _mix_(sums.bitwise_and(_MASK32).bitwise_xor_(tail))


def _sequence_keys(tokens: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """A 32-bit key [B, 1] per sequence from (seed, step, its tokens), on the tokens' device."""
    base = _domain_key(_SEQUENCE_TAG, seed, step)
    words = _position_words(tokens, base)
    return _close(words.sum(dim=1, keepdim=True), base, tokens.shape[1])


def _premix(first: int, last: int, device: torch.device) -> torch.Tensor:
    # Counters are mixed before the key is added: with keys added to raw counters, two rows whose keys differ by
    # less than the counter range would draw shifted copies of one stream.
    counters = torch.arange(first, last, dtype=torch.int64, device=device).mul_(2)
    return _mix_(torch.cat((counters, counters + 1)))  # [radius counters, angle counters]


_premix_cached = functools.lru_cache(maxsize=16)(_premix)
_CACHED_PAIRS = 2**12  # a vocabulary row (generation's per-token draw): kept, saving ~20 kernels per token


def _counters(first: int, last: int, device: torch.device) -> torch.Tensor:
    """The pre-mixed counters [2 * (last - first)] of pairs first..last-1 (the radii's, then the angles'); small
    ranges are computed once."""
    if last - first <= _CACHED_PAIRS:
        return _premix_cached(first, last, device)
    return _premix(first, last, device)


def keyed_normals(keys: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1) [N, count] for int64 keys [N, 1]: row n is a pure function of keys[n] (and count's pairing).

    A counter-based draw: a pre-mixed counter per pair of outputs and the row's key give two 32-bit words per
    pair (lowbias32), those two uniforms and a sign, and Box-Muller two normals (the first `pairs` outputs are
    the cosines, the next the sines). The integers are exact everywhere, and the transform runs in float64 (log
    and cos within an ulp of double on CPU and CUDA alike, the rest correctly rounded) before rounding to
    `dtype`, so CPU and CUDA give the same numbers (barring a rare last-bit rounding tie).
    """
    rows_total = keys.shape[0]
    device = keys.device
    pairs = (count + 1) // 2
    out = torch.empty(rows_total, 2 * pairs, dtype=dtype, device=device)
    budget = _CHUNK.get(device.type, _CHUNK["cuda"])
    pair_chunk = min(pairs, budget)
    row_chunk = max(1, budget // pair_chunk)
    for first in range(0, pairs, pair_chunk):
        last = min(first + pair_chunk, pairs)
        counters = _counters(first, last, device)
        span = last - first
        for row in range(0, rows_total, row_chunk):
            key = keys[row:row + row_chunk]
            bits = _mix_((counters + key).bitwise_and_(_MASK32))  # both words of each pair in one pass
            radius_bits, angle_bits = bits[:, :span], bits[:, span:]
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
    return out[:, :count]


def sequence_keyed_starts(tokens: torch.Tensor, seed: int, step: int, vocab_size: int, std: float,
                          dtype: torch.dtype) -> torch.Tensor:
    """Initial candidate logits [B, S, V] for tokens [B, S+1]: N(0, std^2) noise keyed by (seed, step, that
    sequence's tokens).

    A sequence thus starts from the same noise whichever rank, micro-batch or batch position it lands in, so
    an EBT run depends on the global batch, not on the world size or the accumulation split. Drawn on the
    tokens' device without a host round trip."""
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    keys = _sequence_keys(tokens.detach(), seed, step)
    return keyed_normals(keys, length * vocab_size, dtype).reshape(batch, length, vocab_size).mul_(std)


def eval_starts(tokens: torch.Tensor, seed: int, sample: int, vocab_size: int, std: float,
                dtype: torch.dtype) -> torch.Tensor:
    """Initial candidates of sample `sample` for evaluation: keyed by (seed, sample, the sequence's tokens).

    Used by the trainer's validation (sample 0) and by `ebt eval` (sample m of a cell with several chains),
    so both score a sequence from the same start wherever it lands. Training keys its starts by step >= 0;
    evaluation takes the keys -1, -2, ... so the two never share a start.
    """
    return sequence_keyed_starts(tokens, seed, -1 - sample, vocab_size, std, dtype)


def prefix_keys(tokens: torch.Tensor, seed: int, sample: int) -> torch.Tensor:
    """int64 keys [B, S] for tokens [B, S]: position t's from (seed, sample, tokens[:, :t+1]) (a cumulative
    sum of position-carrying words, closed with the prefix's length)."""
    base = _domain_key(_PREFIX_TAG, seed, sample)
    sums = _position_words(tokens.detach(), base).cumsum(dim=1)  # < 2**32 * S: no int64 overflow
    lengths = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return _close(sums, base, lengths)


def prefix_keyed_starts(tokens: torch.Tensor, seed: int, samples: int, vocab_size: int, std: float,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial logits [B, samples, S, V] for tokens [B, S]: chain m at position t keyed by (seed, m,
    tokens[:, :t+1])."""
    batch, length = tokens.shape
    if std == 0:
        return torch.zeros(batch, samples, length, vocab_size, dtype=dtype, device=tokens.device)
    keys = torch.stack([prefix_keys(tokens, seed, m) for m in range(samples)], dim=1)  # [B, M, S]
    return keyed_normals(keys.reshape(-1, 1), vocab_size, dtype).view(batch, samples, length, vocab_size).mul_(std)


class PrefixKeys:
    """The prefix keys of the last position of a growing batch [B, L], for `samples` chains, extended one token
    at a time (generation): O(1) device work per token, and the same keys as `prefix_keys` over the whole text."""

    def __init__(self, tokens: torch.Tensor, seed: int, samples: int) -> None:
        self.bases = [_domain_key(_PREFIX_TAG, seed, m) for m in range(samples)]
        self.device = tokens.device
        self.sums = torch.stack([_position_words(tokens.detach(), base).sum(dim=1) for base in self.bases],
                                dim=1)  # [B, samples]
        self.length = tokens.shape[1]

    def _per_sample(self, words: list[int]) -> torch.Tensor:
        return torch.tensor(words, dtype=torch.int64, device=self.device)  # [samples]

    def extend(self, token: torch.Tensor) -> None:
        """Append token [B] to every sequence; the positions' mixes are host ints (no kernels for them), and all
        samples are one tensor."""
        positions = self._per_sample([_mix_int(base + self.length) for base in self.bases])
        word = token.detach().to(torch.int64).bitwise_and(_MASK32)[:, None]
        self.sums = self.sums + _mix_(word.bitwise_xor(positions))
        self.length += 1

    def last(self) -> torch.Tensor:
        """int64 keys [B, samples] of the last position's prefix."""
        tails = self._per_sample([_mix_int(base ^ self.length) for base in self.bases])
        return _mix_(self.sums.bitwise_and(_MASK32).bitwise_xor_(tails))

    def starts(self, vocab_size: int, std: float, dtype: torch.dtype) -> torch.Tensor:
        """The last position's starts [B * samples, V] (sample-minor, as `repeat_interleave` lays chains out)."""
        keys = self.last()
        if std == 0:
            return torch.zeros(keys.numel(), vocab_size, dtype=dtype, device=keys.device)
        return keyed_normals(keys.reshape(-1, 1), vocab_size, dtype).mul_(std)
