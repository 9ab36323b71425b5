"""Loss options: ignore index, label-smoothing schedule, contrastive energy term, random steps and alpha jitter."""

import torch
from ebt_factories import tiny_model

from ebt.losses import smoothing_schedule, token_cross_entropy
from ebt.mcmc import run_mcmc


def test_ignored_targets_do_not_count():
    """Targets set to ignore_index drop out of the mean: the loss equals that of the unignored prefix."""
    model = tiny_model()
    tokens = torch.randint(0, 11, (1, 7))
    init = torch.randn(1, 6, 11, dtype=torch.float64)
    prefix, _ = model.loss(tokens[:, :4], init_logits=init[:, :3])
    trajectory = run_mcmc(model.energy_fn(tokens[:, :-1]), init, model.cfg.thinking.mcmc_steps, model.alpha,
                          create_graph=False)
    targets = tokens[:, 1:].clone()
    targets[:, 3:] = model.cfg.loss.ignore_index
    masked = torch.stack([token_cross_entropy(x, targets,
                                              model.cfg.loss.ignore_index) for x in trajectory.logits]).mean()
    unmasked = torch.stack([token_cross_entropy(x, tokens[:, 1:],
                                                model.cfg.loss.ignore_index) for x in trajectory.logits])
    assert abs(masked.item() - prefix.item()) < 1e-12
    assert abs(unmasked.mean().item() - prefix.item()) > 1e-6


def test_label_smoothing_schedule_applies_per_step_and_metrics_stay_unsmoothed():
    assert smoothing_schedule(0.2, 0.0, 3) == [0.2, 0.1, 0.0]
    tokens = torch.randint(0, 11, (2, 6))
    init = torch.randn(2, 5, 11, dtype=torch.float64)
    plain = tiny_model()
    smoothed = tiny_model(label_smoothing_start=0.3, label_smoothing_end=0.1)
    loss_plain, metrics_plain = plain.loss(tokens, init_logits=init)
    loss_smooth, metrics_smooth = smoothed.loss(tokens, init_logits=init)
    assert abs(loss_plain.item() - loss_smooth.item()) > 1e-6
    assert metrics_plain["ce_step_0"] == metrics_smooth["ce_step_0"]


def test_contrastive_term_adds_a_differentiable_hinge():
    tokens = torch.randint(0, 11, (2, 6))
    init = torch.randn(2, 5, 11, dtype=torch.float64)
    base = tiny_model()
    contrastive = tiny_model(contrastive_weight=1.0, contrastive_margin=5.0)
    loss_base, _ = base.loss(tokens, init_logits=init)
    loss_con, _ = contrastive.loss(tokens, init_logits=init)
    assert loss_con.item() > loss_base.item()  # a 5-nat margin cannot be met by an untrained model
    loss_con.backward()
    assert contrastive.energy_model.energy_head.weight.grad.abs().sum() > 0


def test_random_step_count_and_alpha_jitter_apply_only_in_training():
    model = tiny_model(mcmc_steps=3, random_steps_min=1, alpha_jitter=0.5)
    tokens = torch.randint(0, 11, (2, 6))
    model.train()
    seen = {model.loss(tokens)[1]["mcmc_steps"] for _ in range(12)}
    assert seen <= {1.0, 2.0, 3.0} and len(seen) > 1
    model.eval()
    assert model.loss(tokens)[1]["mcmc_steps"] == 3.0
    init = torch.randn(2, 5, 11, dtype=torch.float64)
    a, _ = model.loss(tokens, init_logits=init)
    b, _ = model.loss(tokens, init_logits=init)
    assert a.item() == b.item()  # no jitter outside training
