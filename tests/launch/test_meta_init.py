"""launch/meta_init.py: a model built on the meta device yields, for each rank, exactly FSDP2's Shard(0) piece of
a CPU build's parameters, its buffers whole, and the CPU RNG state a CPU build leaves (issue 22).

One process, no process group: the recorder takes (rank, world) itself. The 2-rank fsdp runs that build through
it are tests/launch/test_train_parity.py's fsdp cases (weights and gradients against one process, fp64 to 1e-12)
and tests/launch/test_train_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from model_configs import model_config

from ebt import build_model
from launch.meta_init import MetaInitError, MetaInitRecorder, materialise, record_build, shard_piece

SEED = 11


def tiny(kind: str, init_scheme: str, **extra: object):
    return model_config(kind=kind, dim=32, n_layers=2, n_heads=2, vocab_size=64, context_length=16,
                        init_scheme=init_scheme, **extra)


def cpu_build(cfg) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(SEED)
    model = build_model(cfg)
    return model, torch.get_rng_state()


# A budget below most single parameters here (tok_emb is 8 KiB), so nearly every storage is cut down to its
# piece soon after it is made and the test sees the eviction path, not just full shadows.
SMALL_BUDGET = 4096


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
@pytest.mark.parametrize("init_scheme", ["reference", "scaled_normal"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_meta_build_pieces_equal_cpu_build_chunks(kind, init_scheme, world):
    cfg = tiny(kind, init_scheme)
    reference, rng_after = cpu_build(cfg)
    for rank in range(world):
        torch.manual_seed(SEED)
        model, init = record_build(lambda: build_model(cfg), rank, world, budget_bytes=SMALL_BUDGET)
        assert torch.equal(torch.get_rng_state(), rng_after), "the meta build consumed the CPU RNG differently"
        assert all(p.device.type == "meta" for p in model.parameters())
        assert set(init.pieces) == {name for name, _ in reference.named_parameters()}
        for name, param in reference.named_parameters():
            full = param.detach().reshape(1) if param.dim() == 0 else param.detach()  # 0-d sharded as [1]
            chunks = torch.chunk(full, world, 0)
            expected = chunks[rank] if rank < len(chunks) else full[:0]  # FSDP2: empty past the last chunk
            piece = init.pieces[name]
            assert piece.dtype == param.dtype and piece.shape == expected.shape, name
            assert torch.equal(piece, expected), name  # bitwise: equal values, NaNs excluded by the model's init
        buffers = dict(reference.named_buffers())
        assert set(init.buffers) == set(buffers)
        for name, buffer in buffers.items():
            assert torch.equal(init.buffers[name], buffer), name


@pytest.mark.parametrize("extra", [{"variant": "adaln", "init_scheme": "scaled_normal"},
                                   {"variant": "adaln"}, {"variant": "time_embed"},
                                   {"langevin_learnable": True, "langevin_noise_std": 0.1}],
                         ids=["adaln_scaled", "adaln_reference", "time_embed", "langevin_learnable"])
def test_meta_build_of_ebt_variants(extra):
    """adaLN's scaled init writes ones into part of each (long evicted) bias: written into the piece."""
    cfg = tiny("ebt", extra.pop("init_scheme", "reference"), **extra)
    reference, rng_after = cpu_build(cfg)
    for rank in range(2):
        torch.manual_seed(SEED)
        _, init = record_build(lambda: build_model(cfg), rank, 2, budget_bytes=SMALL_BUDGET)
        assert torch.equal(torch.get_rng_state(), rng_after)
        for name, param in reference.named_parameters():
            assert torch.equal(init.pieces[name], shard_piece(param.detach(), rank, 2)), name


def test_shard_piece_follows_torch_chunk_and_fsdp_empty_ranks():
    full = torch.arange(10.0).reshape(5, 2)
    assert [shard_piece(full, r, 3).shape[0] for r in range(3)] == [2, 2, 1]
    assert [shard_piece(full, r, 4).shape[0] for r in range(4)] == [2, 2, 1, 0]  # chunk gives 3 pieces of 2,2,1
    assert shard_piece(torch.tensor(0.5), 0, 2).tolist() == [0.5]  # 0-d as [1], as _scalar_params_as_1d
    assert shard_piece(torch.tensor(0.5), 1, 2).shape == (0,)


def test_reading_an_evicted_storage_raises():
    """A read of a value that was cut down to this rank's shard is an error, not a silently different init."""
    with pytest.raises(MetaInitError, match="whole value"):
        with MetaInitRecorder(rank=0, world=2, budget_bytes=0):
            first = torch.empty(8, 4)
            torch.nn.init.normal_(first)
            second = torch.empty(8, 4)
            torch.nn.init.normal_(second)  # evicts `first` (budget 0: only the op at hand stays whole)
            second.add_(first)


def test_host_values_read_during_init_are_the_cpu_builds():
    """`.item()` on a meta tensor has no meta kernel; during the build it answers from the CPU shadow."""
    torch.manual_seed(SEED)
    expected = torch.empty(3).normal_().sum().item()
    torch.manual_seed(SEED)
    with MetaInitRecorder(rank=0, world=2):
        value = torch.empty(3).normal_().sum().item()
    assert value == expected


def test_whole_overwrite_of_an_evicted_storage_starts_afresh():
    torch.manual_seed(SEED)
    expected = torch.empty(8, 4)
    torch.nn.init.normal_(expected)
    torch.nn.init.uniform_(torch.empty(8, 4))
    torch.nn.init.normal_(expected)
    torch.manual_seed(SEED)
    with MetaInitRecorder(rank=1, world=2, budget_bytes=0) as recorder:
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(torch.empty(8, 4))
        torch.nn.init.normal_(model.weight)
        torch.nn.init.uniform_(torch.empty(8, 4))  # evicts weight
        torch.nn.init.normal_(model.weight)  # whole overwrite: fine
    init = recorder.finish(model)
    assert torch.equal(init.pieces["weight"], expected[4:])


def test_materialise_fills_an_unsharded_meta_model():
    """World 1 without FSDP: materialise allocates and fills each tensor whole (what to_local() gets per rank)."""
    cfg = tiny("ebt", "reference")
    reference, _ = cpu_build(cfg)
    torch.manual_seed(SEED)
    model, init = record_build(lambda: build_model(cfg), 0, 1)
    materialise(model, init, torch.device("cpu"))
    for (name, param), (_, expected) in zip(model.state_dict(keep_vars=True).items(),
                                            reference.state_dict(keep_vars=True).items(), strict=True):
        assert torch.equal(param, expected), name
    for name, buffer in reference.named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
