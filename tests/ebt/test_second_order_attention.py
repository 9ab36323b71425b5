"""Alternative candidate attentions: exact against the explicit one, and twice differentiable (gradgradcheck)."""

import pytest
import torch

from benchmarks.experimental.attention_impls import IMPLEMENTATIONS
from ebt.attention import visibility_bias


def inputs(batch=2, heads=2, candidates=5, real=6, head_dim=4, offset=1):
    torch.manual_seed(0)
    shape = (batch, heads, candidates, head_dim)
    q, k_self, v_self = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k_real, v_real = (torch.randn(batch, heads, real, head_dim, dtype=torch.float64, requires_grad=True)
                      for _ in range(2))
    bias = visibility_bias(torch.arange(candidates) + offset, real, torch.float64)
    return q, k_self, v_self, k_real, v_real, bias


@pytest.mark.parametrize("name", ["sdpa_math", "function"])
def test_matches_explicit_with_first_and_second_derivatives(name):
    args = inputs()
    tensors = args[:5]
    reference, other = IMPLEMENTATIONS["explicit"](*args), IMPLEMENTATIONS[name](*args)
    assert (reference - other).abs().max() < 1e-12
    cotangent = torch.randn_like(reference)
    grads_a = torch.autograd.grad(reference, tensors, cotangent, create_graph=True)
    grads_b = torch.autograd.grad(other, tensors, cotangent, create_graph=True)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a - b).abs().max() < 1e-12
    # The EBT's outer backward: differentiate a function of the first gradient again.
    probe = [torch.randn_like(g) for g in grads_a]
    second_a = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads_a, probe, strict=True)), tensors)
    second_b = torch.autograd.grad(sum((g * p).sum() for g, p in zip(grads_b, probe, strict=True)), tensors)
    for a, b in zip(second_a, second_b, strict=True):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["sdpa_math", "function"])
def test_gradgradcheck(name):
    q, k_self, v_self, k_real, v_real, bias = inputs(batch=1, heads=1, candidates=3, real=4, head_dim=2)
    fn = lambda *t: IMPLEMENTATIONS[name](*t, bias)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k_self, v_self, k_real, v_real))
    assert torch.autograd.gradgradcheck(fn, (q, k_self, v_self, k_real, v_real))
