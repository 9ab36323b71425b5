"""System-2 inference: more thinking steps, several random starts, keep the best sample; and generation.

Energies along a chain are those the descent already computes (one energy and gradient per step) plus the final
point's, so a chain of `steps` steps costs steps + 1 energy evaluations (accept-lower adds one per step).
Step-conditioned variants run step n on landscape n, and every step past the trained ones (and the final
score) on the last trained landscape, never on an untrained table row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ebt.mcmc import NonFiniteMonitor, ThinkingLoop, candidate, run_mcmc
from ebt.starts import PrefixKeys, prefix_keyed_starts
from ebt.validation import check_positive_int, check_tokens

SELECTIONS = ("min", "max", "max_gap")


@dataclass
class ThinkResult:
    logits: torch.Tensor  # [B, S, V] final logits of the chosen sample per token
    energies: torch.Tensor  # [B, samples, steps + 1, S] energy at every point of every chain
    chosen: torch.Tensor  # [B, S] index of the chosen sample per token
    final_energy: torch.Tensor  # [B, S] energy of the chosen sample's final point

    @property
    def mean_energy_per_step(self) -> torch.Tensor:
        """[steps + 1] mean energy of the chosen samples' chains."""
        index = self.chosen[:, None, None, :].expand(-1, 1, self.energies.shape[2], -1)
        return self.energies.gather(1, index).squeeze(1).mean(dim=(0, 2))


def descend(
    energy_fn: Callable[[torch.Tensor, int], torch.Tensor],
    starts: torch.Tensor,
    steps: int,
    step_size: torch.Tensor,
    *,
    trained_landscapes: int = 1,
    loop: ThinkingLoop | None = None,
    accept_lower: bool = False,
    noise: float = 0.0,
    noise_first_step_only: bool = False,
    bound: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    score_final: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """System 2's descent, without a graph: final states and energies [steps + 1, ...] ([steps, ...] without
    score_final). The steps are ebt.mcmc.run_mcmc's; this only plans the landscapes and scores the final point.

    Step n runs on landscape min(n, trained_landscapes - 1), so steps past the trained ones reuse the last
    trained landscape; energies[n] is step n's input energy there, and energies[steps] scores the final point on
    the last trained landscape, as the reference does, so samples are compared on one landscape (a caller with
    one sample and no use for energies skips it: score_final=False saves an energy evaluation).
    noise: Langevin std, placed as loop.langevin_placement says (only at the first step with
    noise_first_step_only, the reference's infer_langevin_first_step), drawn from `generator`.
    accept_lower: a token keeps its current state unless the proposal's energy, on the same landscape, is
    strictly lower, so its energy never rises along the chain.
    A non-finite inner gradient raises NonFiniteEnergyGradientError after the loop (one host read per call,
    not one per step).
    """
    loop = ThinkingLoop() if loop is None else loop
    last = trained_landscapes - 1
    state = starts.detach()
    energies: list[torch.Tensor] = []
    if steps > 0:
        def draw(_: int, like: torch.Tensor) -> torch.Tensor:
            return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

        monitor = NonFiniteMonitor()
        trajectory = run_mcmc(
            energy_fn, state, [min(n, last) for n in range(steps)], step_size.detach(), create_graph=False,
            loop=loop, noise_std=noise, noise=draw, noise_first_step_only=noise_first_step_only,
            bound=bound.detach() if torch.is_tensor(bound) else bound, accept_lower=accept_lower,
            keep_states=False, monitor=monitor,
        )
        monitor.raise_if_nonfinite()
        state, energies = trajectory.logits[-1].detach(), trajectory.energies
    if score_final:
        with torch.no_grad():
            energies.append(energy_fn(candidate(state, loop.rule(steps)), last))
    return state, torch.stack(energies) if energies else state.new_empty((0, *state.shape[:-1]))


def inference_step_size(model, alpha_override: float = 0.0) -> torch.Tensor:
    """The trained alpha, scaled by 0 < alpha_override < 1, or replaced by alpha_override >= 1 (the
    reference's infer_ebt_override_alpha); 0 keeps it."""
    alpha = model.alpha.detach()
    if alpha_override < 0:
        raise ValueError(f"alpha_override: must be >= 0, got {alpha_override}")
    if 0 < alpha_override < 1:
        return alpha * alpha_override
    if alpha_override >= 1:
        return torch.full_like(alpha, alpha_override)
    return alpha


def select_samples(energies: torch.Tensor, selection: str) -> torch.Tensor:
    """energies [B, M, steps + 1, S] -> chosen sample index [B, S]."""
    if selection == "min":
        return energies[:, :, -1].argmin(dim=1)
    if selection == "max":
        return energies[:, :, -1].argmax(dim=1)
    if selection == "max_gap":
        return (energies[:, :, 0] - energies[:, :, -1]).argmax(dim=1)
    raise ValueError(f"selection: unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")


@torch.no_grad()
def think(
    model,
    tokens: torch.Tensor,
    steps: int,
    samples: int = 1,
    selection: str = "min",
    accept_lower: bool = False,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    starts: torch.Tensor | None = None,
    alpha_override: float = 0.0,
    noise_first_step_only: bool = False,
    *,
    seed: int = 0,
) -> ThinkResult:
    """Refine candidates for every position of tokens [B, S] with `samples` chains of `steps` steps each.

    `starts` [B, samples, S, V] gives the chains' initial logits; by default chain m at position t starts from
    ebt.starts' draw keyed by (seed, m, tokens[:, :t+1]), so a position's prediction depends on its prefix only
    and sample m is the same chain whatever `samples` is. `generator` draws the Langevin noise.
    alpha_override and noise_first_step_only are the reference's infer_ebt_override_alpha and
    infer_langevin_first_step (see `descend` and `inference_step_size`).
    """
    cfg = model.cfg
    check_tokens("tokens", tokens, cfg.architecture.vocab_size, cfg.architecture.context_length)
    check_positive_int("steps", steps, minimum=0)
    check_positive_int("samples", samples)
    if selection not in SELECTIONS:
        raise ValueError(f"selection: unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    batch, length = tokens.shape
    if starts is None:
        starts = prefix_keyed_starts(tokens, seed, samples, cfg.architecture.vocab_size, cfg.thinking.init_logit_std,
                                     model.alpha_raw.dtype)
    elif tuple(starts.shape) != (batch, samples, length, cfg.architecture.vocab_size):
        expected = (batch, samples, length, cfg.architecture.vocab_size)
        raise ValueError(f"starts: expected shape {expected}, got {tuple(starts.shape)}")
    flat_tokens = tokens.repeat_interleave(samples, dim=0)
    energy_fn = model.energy_fn(flat_tokens)
    logits, energies = descend(
        energy_fn,
        starts.flatten(0, 1),
        steps,
        inference_step_size(model, alpha_override),
        trained_landscapes=cfg.thinking.mcmc_steps,
        loop=model.thinking_loop,
        accept_lower=accept_lower,
        noise=noise,
        noise_first_step_only=noise_first_step_only,
        bound=model.grad_bound(),
        generator=generator,
    )
    energies = energies.view(steps + 1, batch, samples, length).permute(1, 2, 0, 3)
    logits = logits.view(batch, samples, length, cfg.architecture.vocab_size)
    chosen = select_samples(energies, selection)
    picked = logits.gather(1, chosen[:, None, :, None].expand(-1, 1, -1, cfg.architecture.vocab_size)).squeeze(1)
    final_energy = energies[:, :, -1].gather(1, chosen[:, None, :]).squeeze(1)
    return ThinkResult(picked, energies, chosen, final_energy)


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token [B] from logits [B, V]: greedy when temperature == 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    steps: int | None = None,
    samples: int = 1,
    selection: str = "min",
    temperature: float = 0.0,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
) -> torch.Tensor:
    """Extend prompt [B, P] by max_new_tokens; the real stream is cached and extended one token at a time.

    steps: thinking steps per token (None: ModelConfig.eval_steps, as `ebt generate`). Chain m of the position
    after a text starts from ebt.starts' draw keyed by (seed, m, the text so far), the start `think` gives that
    position; `generator` only samples tokens (temperature > 0).
    on_token: called with each new token [B] as soon as it is chosen, for streaming; returning True stops the
    generation there (the tokens so far are returned). It only observes, so the tokens are those generated
    without it.
    """
    cfg = model.cfg
    check_tokens("prompt", prompt, cfg.architecture.vocab_size, cfg.architecture.context_length)
    check_positive_int("max_new_tokens", max_new_tokens)
    if prompt.shape[1] + max_new_tokens > cfg.architecture.context_length:
        raise ValueError(f"max_new_tokens: prompt + {max_new_tokens} exceeds context_length "
                         f"{cfg.architecture.context_length}")
    if cfg.kind == "transformer":
        return _generate_transformer(model, prompt, max_new_tokens, temperature, top_p, generator, on_token)
    steps = cfg.thinking.eval_steps if steps is None else steps
    check_positive_int("steps", steps, minimum=0)
    energy_model = model.energy_model
    last = cfg.thinking.mcmc_steps - 1
    step_keys = sorted({min(n, last) for n in range(steps)} | {last}) if not cfg.caches_context else [0]
    contexts = {k: energy_model.context(prompt.repeat_interleave(samples, 0), k) for k in step_keys}
    keys = PrefixKeys(prompt, seed, samples)
    step_size, bound, dtype = model.alpha.detach(), model.grad_bound(), model.alpha_raw.dtype
    batch = prompt.shape[0]
    rows = torch.arange(batch, device=prompt.device)
    tokens = prompt
    for _ in range(max_new_tokens):
        candidate_index = torch.tensor([tokens.shape[1] - 1], device=tokens.device)

        def energy_fn(probs: torch.Tensor, step: int, contexts=contexts, index=candidate_index) -> torch.Tensor:
            context = contexts[step if step in contexts else 0]
            return energy_model.candidate_energies(context, probs, step, candidate_index=index)

        vocab, std = cfg.architecture.vocab_size, cfg.thinking.init_logit_std
        starts = keys.starts(vocab, std, dtype)[:, None]  # [B * samples, 1, V]
        # With one chain nothing is selected, so its final point needs no energy (one evaluation per token).
        logits, energies = descend(energy_fn, starts, steps, step_size, trained_landscapes=cfg.thinking.mcmc_steps,
                                   loop=model.thinking_loop, bound=bound, score_final=samples > 1)
        logits = logits.view(batch, samples, cfg.architecture.vocab_size)
        if samples > 1:
            energies = energies.view(steps + 1, batch, samples, 1).permute(1, 2, 0, 3)
            logits = logits[rows, select_samples(energies, selection)[:, 0]]
        else:
            logits = logits[:, 0]
        next_token = sample_token(logits, temperature, top_p, generator)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        if on_token is not None and on_token(next_token):
            break
        keys.extend(next_token)
        new = next_token[:, None].repeat_interleave(samples, 0)
        contexts = {k: energy_model.extend_context(ctx, new, k) for k, ctx in contexts.items()}
    return tokens


def _generate_transformer(model, prompt, max_new_tokens, temperature, top_p, generator, on_token) -> torch.Tensor:
    logits, cache = model.logits(prompt)
    tokens = prompt
    for _ in range(max_new_tokens):
        next_token = sample_token(logits[:, -1], temperature, top_p, generator)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        if on_token is not None and on_token(next_token):
            break
        logits, cache = model.logits(next_token[:, None], cache)
    return tokens
