"""Checkpointing policies change memory, never results: loss and every parameter gradient match "none" (fp64)."""

import weakref

import pytest
import torch
from ebt_factories import tiny_model

from benchmarks.experimental.step_runners import use_step_impl
from ebt.checkpointing import parse_policy
from launch.config import build_config

# "policy/n": recompute n sequences at a time (cfg.remat_chunk); the test batch has 3 sequences.
POLICIES = ["block", "mcmc_step", "block+mcmc_step", "mcmc_step/1", "block+mcmc_step/2"]


def loss_and_grads(model, tokens, init_logits, seed=0):
    torch.manual_seed(seed)  # alpha jitter, random K and Langevin noise draw from the global RNG
    model.zero_grad()
    loss, metrics = model.loss(tokens, init_logits=init_logits)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference, other, tol=1e-10):
    loss_a, metrics_a, grads_a = reference
    loss_b, metrics_b, grads_b = other
    assert abs(loss_a - loss_b) < tol
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        # Metrics are 0-d device tensors (one host read per optimizer step); compare them as numbers, since
        # pytest.approx's handling of tensors is its own internals (9.2 iterates them and fails on 0-d).
        assert float(metrics_a[key]) == pytest.approx(float(metrics_b[key]), abs=1e-9), key
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].abs().max() > 0, name
        assert (grads_a[name] - grads_b[name]).abs().max() < tol, name


def compare(policies, steps=2, impl="function", **overrides):
    tokens = torch.randint(0, 11, (3, 7))
    init_logits = torch.randn(3, 6, 11, dtype=torch.float64)
    reference_model = tiny_model(mcmc_steps=steps, **overrides)
    reference = loss_and_grads(reference_model, tokens, init_logits)
    for spec in policies:
        policy, _, chunk = spec.partition("/")
        model = tiny_model(mcmc_steps=steps, checkpointing=policy, remat_chunk=int(chunk or 0), **overrides)
        if impl != "function":  # the default RematerialisedStep needs nothing
            use_step_impl(model, impl)
        model.load_state_dict(reference_model.state_dict())
        assert_same(reference, loss_and_grads(model, tokens, init_logits))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_every_policy_matches_no_checkpointing(steps):
    compare(POLICIES, steps=steps)


@pytest.mark.parametrize("variant", ["time_embed", "adaln"])
def test_step_conditioned_variants(variant):
    compare(POLICIES, steps=2, variant=variant)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(truncate=True, mcmc_steps=3),
        dict(use_context_cache=False),
        dict(alpha_jitter=0.3, grad_clamp=0.05, langevin_noise_std=0.1),
        dict(random_steps_min=1, mcmc_steps=3, label_smoothing_start=0.2, contrastive_weight=0.5),
        dict(tie_candidate_embedding=False, replay_capacity=4, replay_fraction=0.5),
        # The paper's presets' semantics (configs/recipes): S1, and S2's levers (no detach, truncation, noise at
        # the input, randomised step sizes, repeated landscapes) with the reference's clamp and contrastive term.
        dict(variant="time_embed", update_space="probs", detach_steps=True),
        dict(variant="time_embed", update_space="probs", detach_steps=False, truncate=True, mcmc_steps=1,
             landscape_repeats=2, landscape_repeats_min=2, alpha_random_scale=2.0, langevin_noise_std=0.3,
             replay_capacity=4, replay_fraction=0.5),
        dict(update_space="probs", grad_clamp=0.5, grad_clamp_mode="max_change", contrastive_weight=0.3,
             contrastive_form="softmax", normalize="first_step", candidate_clamp=2.0),
        dict(update_space="logits", detach_steps=False, langevin_placement="after_update", langevin_noise_std=0.1,
             grad_clamp=0.05, grad_clamp_mode="absolute", contrastive_form="margin", contrastive_weight=0.5),
    ],
    ids=["truncate", "no-cache", "jitter-clamp-noise", "random-k-smoothing-contrastive", "untied-replay", "s1",
         "s2", "reference-clamp-contrastive", "logits-preset"],
)
def test_training_options(overrides):
    steps = overrides.pop("mcmc_steps", 2)
    compare(["mcmc_step", "block+mcmc_step", "mcmc_step/1"], steps=steps, **overrides)


def test_generic_checkpoint_implementation_matches_too():
    compare(["mcmc_step"], steps=2, impl="generic")


def test_auto_resolves_to_a_policy_with_identical_gradients():
    """"auto" is resolved before the model is built (planning.resolve_checkpointing), never by the model: the
    resolved policy computes what "none" computes, and a model handed an unresolved "auto" refuses to train."""
    from ebt.checkpointing import UnresolvedCheckpointingError
    from planning import resolve_checkpointing

    unresolved = tiny_model(mcmc_steps=2, checkpointing="auto")
    policy, chunk = resolve_checkpointing(unresolved.cfg, "auto", 3, budget_gb=64.0)
    assert policy in ("none", "block", "mcmc_step", "block+mcmc_step")
    compare([f"{policy}/{chunk}"], steps=2)
    tokens = torch.randint(0, 11, (3, 7))
    with pytest.raises(UnresolvedCheckpointingError, match=r"^trainer.checkpointing: 'auto' is resolved before"):
        unresolved.loss(tokens)
    with torch.no_grad():  # no second-order graph to checkpoint: evaluation runs plain steps
        assert torch.isfinite(unresolved.loss(tokens)[0])


class _Saved:
    def __init__(self, tensor):
        self.tensor = tensor


def retained_bytes_after_forward(policy, steps):
    """Bytes of distinct storages that the autograd graph still holds once the loss is computed."""
    model = tiny_model(mcmc_steps=steps, checkpointing=policy, vocab_size=64, dim=16, context_length=16)
    tokens = torch.randint(0, 64, (4, 17))
    boxes = []

    def pack(tensor):
        box = _Saved(tensor)
        boxes.append(weakref.ref(box))  # dies with the graph that holds it
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        loss, _ = model.loss(tokens)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    for ref in boxes:
        box = ref()
        if box is not None:
            storage = box.tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
    del loss
    return sum(storages.values())


def test_mcmc_step_keeps_only_step_inputs_alive():
    """Under "mcmc_step" the forward saves the step inputs, not the second-order graph: far less is saved, and
    what is saved grows with K by about one [B, S, V] tensor set per step, not by a whole graph."""
    none_2, none_4 = retained_bytes_after_forward("none", 2), retained_bytes_after_forward("none", 4)
    step_2, step_4 = retained_bytes_after_forward("mcmc_step", 2), retained_bytes_after_forward("mcmc_step", 4)
    assert step_2 < 0.2 * none_2
    assert (step_4 - step_2) < 0.1 * (none_4 - none_2)
    assert retained_bytes_after_forward("block", 2) < none_2  # block drops the forward's share only


def test_inference_and_no_grad_paths_ignore_the_policy():
    model = tiny_model(mcmc_steps=2, checkpointing="block+mcmc_step")
    reference = tiny_model(mcmc_steps=2)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 11, (2, 7))
    init_logits = torch.randn(2, 6, 11, dtype=torch.float64)
    with torch.no_grad():
        a, _ = model.loss(tokens, init_logits=init_logits)
        b, _ = reference.loss(tokens, init_logits=init_logits)
    assert abs(a - b) < 1e-12


def test_bad_policy_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^config key 'trainer.checkpointing': unknown policy 'mcmc'"):
        build_config({"trainer": {"checkpointing": "mcmc"}})
    with pytest.raises(ValueError, match=r"^config key 'trainer.memory_budget_gb': must be > 0"):
        build_config({"trainer": {"checkpointing": "auto", "memory_budget_gb": 0.0}})
    with pytest.raises(ValueError, match=r"^config key 'trainer.remat_chunk': must be >= 0"):
        build_config({"trainer": {"remat_chunk": -1}})
    with pytest.raises(ValueError, match="unknown policy 'auto'"):
        parse_policy("auto")  # auto must be resolved by the planner first
