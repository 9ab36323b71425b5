"""ebt/starts.py: the one keyed start generator.

The sequence-keyed draw must give training exactly the numbers it had before the move (the oracle below is the
pre-move `launch.train_module.sequence_keyed_starts`, kept verbatim as an independent implementation); the
prefix-keyed draw must make a position's start a function of (seed, sample, its prefix) only.
"""

import math

import pytest
import torch

from ebt.starts import PrefixKeys, eval_starts, prefix_keyed_starts, prefix_keys, sequence_keyed_starts

# ---- the oracle: the sequence-keyed draw as launch/train_module.py had it -----------------------------------
_M = 0xFFFFFFFF
_A, _B = 0x7FEB352D, 0x846CA68B


def _old_mix_(x):
    x.bitwise_xor_(x >> 16).mul_(_A).bitwise_and_(_M)
    x.bitwise_xor_(x >> 15).mul_(_B - 2**32).bitwise_and_(_M)
    return x.bitwise_xor_(x >> 16)


def _old_mix_int(x):
    x &= _M
    x = ((x ^ (x >> 16)) * _A) & _M
    x = ((x ^ (x >> 15)) * _B) & _M
    return x ^ (x >> 16)


def _old_sequence_keyed_starts(tokens, seed, step, vocab_size, std, dtype):
    base = 0x45425453
    for word in (seed, seed >> 32, step, step >> 32):
        base = _old_mix_int(base ^ (word & _M))
    length = tokens.shape[1]
    positions = _old_mix_(torch.arange(length, dtype=torch.int64).add_(base).bitwise_and_(_M))
    words = _old_mix_(tokens.to(torch.int64).bitwise_and(_M).bitwise_xor_(positions))
    keys = _old_mix_(words.sum(dim=1, keepdim=True).bitwise_and_(_M).bitwise_xor_(_old_mix_int(base ^ length)))
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    total = length * vocab_size
    pairs = (total + 1) // 2
    counters = torch.arange(pairs, dtype=torch.int64).mul_(2)
    radius_bits = _old_mix_((_old_mix_(counters.clone()) + keys).bitwise_and_(_M))
    angle_bits = _old_mix_((_old_mix_(counters.add_(1)) + keys).bitwise_and_(_M))
    signed = (radius_bits >> 7).sub_(2**24).to(torch.float64).add_(0.5)
    radius = signed.abs().mul_(2.0**-24).log_().mul_(-2.0).sqrt_().copysign_(signed)
    cos = (angle_bits >> 8).to(torch.float64).mul_(math.pi * 2.0**-24).cos_()
    sin = (1.0 - cos.square()).sqrt_()
    out = torch.cat((cos * radius, sin * radius), dim=1).to(dtype)
    return out[:, :total].reshape(batch, length, vocab_size).mul_(std)


@pytest.mark.parametrize("seed, step, vocab, dtype", [
    (0, 0, 11, torch.float32), (7, 3, 51, torch.float32), (2**40 + 5, -1, 8, torch.float64),
    (-3, 12345, 50, torch.float32)])
def test_training_starts_are_the_pre_move_numbers(seed, step, vocab, dtype):
    tokens = torch.randint(0, vocab, (4, 10), generator=torch.Generator().manual_seed(seed % 97))
    expected = _old_sequence_keyed_starts(tokens, seed, step, vocab, 0.7, dtype)
    assert torch.equal(sequence_keyed_starts(tokens, seed, step, vocab, 0.7, dtype), expected)


def test_eval_starts_are_the_sequence_draw_at_negative_steps():
    tokens = torch.randint(0, 13, (3, 6))
    assert torch.equal(eval_starts(tokens, 4, 2, 13, 1.0, torch.float32),
                       _old_sequence_keyed_starts(tokens, 4, -3, 13, 1.0, torch.float32))


def test_a_prefix_keyed_start_depends_only_on_seed_sample_and_prefix():
    vocab = 17
    a = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    b = torch.tensor([[3, 1, 4, 1, 6, 6, 6]])  # same prefix up to position 3
    starts_a = prefix_keyed_starts(a, 5, 2, vocab, 1.0)  # [1, 2, 7, V]
    starts_b = prefix_keyed_starts(b, 5, 2, vocab, 1.0)
    assert torch.equal(starts_a[:, :, :4], starts_b[:, :, :4])  # later tokens change nothing before them
    assert not torch.equal(starts_a[:, :, 4], starts_b[:, :, 4])
    # Batch position and batch companions change nothing; a shorter text gives the same rows.
    batch = torch.cat((b, a), dim=0)
    assert torch.equal(prefix_keyed_starts(batch, 5, 2, vocab, 1.0)[1], starts_a[0])
    assert torch.equal(prefix_keyed_starts(a[:, :3], 5, 2, vocab, 1.0), starts_a[:, :, :3])
    # Sample m is the same chain whatever the number of samples; samples, seeds and positions all differ.
    assert torch.equal(prefix_keyed_starts(a, 5, 1, vocab, 1.0)[:, 0], starts_a[:, 0])
    assert not torch.equal(starts_a[:, 0], starts_a[:, 1])
    assert not torch.equal(prefix_keyed_starts(a, 6, 2, vocab, 1.0), starts_a)
    same_token_rows = starts_a[0, 0, 1], starts_a[0, 0, 3]  # token 1 at positions 1 and 3: different prefixes
    assert not torch.equal(*same_token_rows)


def test_a_prefix_key_is_order_dependent():
    keys = prefix_keys(torch.tensor([[1, 2, 3], [2, 1, 3]]), 0, 0)
    assert keys[0, 0] != keys[1, 0] and keys[0, 2] != keys[1, 2]


def test_incremental_prefix_keys_equal_the_whole_texts():
    tokens = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(2))
    stream = PrefixKeys(tokens[:, :4], seed=11, samples=3)
    for t in range(4, 9):
        assert torch.equal(stream.last(), torch.stack([prefix_keys(tokens[:, :t], 11, m)[:, -1]
                                                       for m in range(3)], dim=1))
        stream.extend(tokens[:, t])
    whole = prefix_keyed_starts(tokens, 11, 3, 30, 0.5)[:, :, -1]  # [B, M, V]
    assert torch.equal(stream.starts(30, 0.5, torch.float32), whole.reshape(9, 30))


def test_keyed_normals_look_standard_normal():
    draws = prefix_keyed_starts(torch.randint(0, 100, (8, 64)), 0, 2, 257, 1.0, torch.float64)
    assert abs(float(draws.mean())) < 0.01 and abs(float(draws.std()) - 1.0) < 0.01
