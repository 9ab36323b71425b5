"""The functional inner gradient (what torch.compile compiles) and forward-over-reverse are exact (fp64)."""

import torch
from ebt_factories import tiny_model
from test_second_order_policies import assert_same, loss_and_grads

from benchmarks.experimental.compiled import enable_compiled_inner_gradient, make_jvp_step_runner
from benchmarks.experimental.step_runners import use_step_runner


def pair(**overrides):
    # The functional paths implement the logits update (other rules fall back to plain steps).
    overrides = {"update_space": "logits", "detach_steps": False, **overrides}
    reference = tiny_model(mcmc_steps=3, **overrides)
    other = tiny_model(mcmc_steps=3, **overrides)
    other.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 11, (2, 7))
    init_logits = torch.randn(2, 6, 11, dtype=torch.float64)
    return reference, other, tokens, init_logits


def test_functional_inner_gradient_matches_autograd_grad():
    reference, functional, tokens, init_logits = pair(variant="adaln", adaln_real_stream=False)
    enable_compiled_inner_gradient(functional, compile=False)  # the eager functional path, exactly what compiles
    assert_same(loss_and_grads(reference, tokens, init_logits), loss_and_grads(functional, tokens, init_logits))


def test_functional_path_falls_back_to_plain_steps_without_a_context_cache():
    reference, functional, tokens, init_logits = pair(variant="time_embed")
    enable_compiled_inner_gradient(functional, compile=False)
    assert_same(loss_and_grads(reference, tokens, init_logits), loss_and_grads(functional, tokens, init_logits))


def test_forward_over_reverse_step_matches_double_backward():
    reference, jvp, tokens, init_logits = pair()
    use_step_runner(jvp, make_jvp_step_runner(jvp.energy_model))
    assert_same(loss_and_grads(reference, tokens, init_logits), loss_and_grads(jvp, tokens, init_logits))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    reference, compiled, tokens, init_logits = pair()

    def broken(*args, **kwargs):
        raise RuntimeError("backend unavailable")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    enable_compiled_inner_gradient(compiled, compile=True)
    import pytest

    with pytest.warns(UserWarning, match="compiled inner gradient failed"):
        result = loss_and_grads(compiled, tokens, init_logits)
    assert_same(loss_and_grads(reference, tokens, init_logits), result)
    assert compiled.step_runner.inner.failed
