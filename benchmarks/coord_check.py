"""Coordinate check (Tensor Programs V, Fig. 5): how big each layer's activations and their updates are, across
widths, for both kinds under SP and μP (issue 24).

For every width the same tiny model (head_dim fixed, so widths grow by heads) is built from one seed and trained
for a few AdamW steps with the optimizer `ebt train` builds (launch/optim.py: μP's hidden group at LR / m). A
fixed batch, the one it trains on, is probed before and after; forward hooks on every Linear and Embedding record
the RMS of each module's output (its "coordinate size") and the RMS of its change. For the EBT the probe is one energy
evaluation of fixed candidates, so the blocks' last call is the candidate stream, and the probe also records
|dE/dy|, the candidate gradient that one MCMC step multiplies by alpha (ebt/parametrization.py derives its
width scaling).

The summary per (kind, parametrization, quantity) is the slope of log size against log width. Under μP the
updates' slopes should be ~0 (flat); under SP they grow (Adam's Theta(lr) per entry summed over d inputs).

    python -m benchmarks.coord_check                  # widths 64..512, JSON + PNG in benchmarks/results
    python -m benchmarks.coord_check --widths 64 128 256 --steps 3
    python -m benchmarks.coord_check --candidate-update    # alpha * dE/dx across widths, 3 seeds, 100 steps
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
HEAD_DIM = 16


@dataclass
class Setting:
    kind: str = "ebt"
    parametrization: str = "sp"
    base_dim: int = 32
    n_layers: int = 2
    vocab_size: int = 320
    # One sequence of 8 tokens: the gradient's rank (<= 8) stays below every width, the regime μP is about; with
    # more tokens than width the updates look full-rank and every parametrization's changes shrink like 1/sqrt(d).
    batch: int = 1
    context_length: int = 8
    steps: int = 10
    lr: float = 3e-3
    seed: int = 0
    model: dict = field(default_factory=dict)  # extra nested model keys (e.g. {"thinking": {...}})


def _raw_config(setting: Setting, width: int) -> dict:
    model = {"kind": setting.kind, "parametrization": setting.parametrization,
             "architecture": {"dim": width, "n_heads": width // HEAD_DIM, "n_layers": setting.n_layers,
                              "vocab_size": setting.vocab_size, "context_length": setting.context_length},
             "mup": {"base_dim": setting.base_dim}}
    for section, values in setting.model.items():
        model[section] = {**model.get(section, {}), **values}
    return {"model": model, "data": {"vocab_size": setting.vocab_size},
            "optim": {"lr": setting.lr, "warmup_steps": 0, "min_lr_scale": 1.0, "weight_decay": 0.0,
                      "clip_grad_norm": 0.0},
            "trainer": {"max_steps": setting.steps, "micro_batch_size": setting.batch}}


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


class _Probe:
    """Forward hooks on every Linear/Embedding: each module's output from its last call in a probe forward."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in model.named_modules()
                        if isinstance(module, (nn.Linear, nn.Embedding))]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self.outputs[name] = output.detach().clone()
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _probe(model: nn.Module, kind: str, tokens: torch.Tensor, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output on the probe batch (and, for the EBT, dE/dy at the candidates)."""
    hooks = _Probe(model)
    try:
        if kind == "ebt":
            energies, grad, update = _energy_gradients(model, tokens, candidates)
            hooks.outputs["dE/dy"] = grad
            hooks.outputs["E"] = energies
            hooks.outputs["candidate update"] = update
            hooks.outputs["alpha"] = model.alpha.detach().reshape(1)
        else:
            with torch.no_grad():
                logits, _ = model.logits(tokens)
            hooks.outputs["logits"] = logits
        return dict(hooks.outputs)
    finally:
        hooks.close()


def _energy_gradients(model: nn.Module, tokens: torch.Tensor,
                      logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One energy evaluation of the candidates softmax(logits) and its backward: (E, dE/dy, the candidate update).

    The candidate update is the change one MCMC step makes to the logits there: alpha * dE/dx in the space the
    model steps in (ebt/mcmc.py: x = softmax(y) under update_space "probs", the reference's; y itself under
    "logits"), less its mean over the vocabulary, which the next softmax ignores."""
    logits = logits.detach().requires_grad_(True)
    probs = torch.softmax(logits, dim=-1)
    energies = model.energies(tokens, probs)
    grad_logits, grad_probs = torch.autograd.grad(energies.sum(), (logits, probs))
    step = grad_probs if model.cfg.thinking.update_space == "probs" else grad_logits
    return energies.detach(), grad_logits, float(model.alpha.detach()) * (step - step.mean(-1, keepdim=True))


def measure(setting: Setting, width: int) -> dict[str, dict[str, float]]:
    """{layer: {"init": RMS of its output at init, "update": RMS of its change after setting.steps steps}}."""
    from ebt import build_model
    from launch.config import build_config
    from launch.optim import build_optimizer
    from launch.schedule import apply_lr

    cfg = build_config(_raw_config(setting, width))
    torch.manual_seed(setting.seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    data = torch.Generator().manual_seed(setting.seed + 1)
    length = setting.context_length
    # One batch, trained on and probed (as Tensor Programs V's check does): an update's effect on the inputs it
    # was computed from is what μP keeps Theta(1). On unrelated random tokens, whose representations are
    # nearly orthogonal to the trained ones, every parametrization's change would look like sqrt(d)/d.
    tokens = torch.randint(setting.vocab_size, (setting.batch, length + 1), generator=data)
    probe_tokens = tokens[:, :-1]
    probe_candidates = torch.randn(setting.batch, length, setting.vocab_size, generator=data)
    before = _probe(model, setting.kind, probe_tokens, probe_candidates)
    model.train()
    for step in range(setting.steps):
        torch.manual_seed(setting.seed + 100 + step)  # the chains' starts: the same at every width
        loss, _ = model.loss(tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_lr(optimizer.param_groups, cfg, step)
        optimizer.step()
    model.eval()
    after = _probe(model, setting.kind, probe_tokens, probe_candidates)
    return {name: {"init": _rms(before[name]), "update": _rms(after[name] - before[name]),
                   "after": _rms(after[name])} for name in before}


def slope(widths: list[int], sizes: list[float]) -> float:
    """Least-squares slope of log(size) on log(width): the exponent of size ~ width^slope."""
    xs = [math.log(w) for w in widths]
    ys = [math.log(max(s, 1e-30)) for s in sizes]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def sweep(setting: Setting, widths: list[int]) -> dict:
    """Every width's measurement plus each layer's slopes (init, update, after) across the widths."""
    per_width = {w: measure(setting, w) for w in widths}
    layers = list(per_width[widths[0]])
    slopes = {layer: {what: slope(widths, [per_width[w][layer][what] for w in widths])
                      for what in ("init", "update", "after")} for layer in layers}
    return {"setting": setting.__dict__, "widths": widths, "per_width": per_width, "slopes": slopes}


def summarize(result: dict) -> dict[str, float]:
    """The slopes a reader compares: the blocks' updates (mean and worst), the readout's output after training
    and, for the EBT, |dE/dy| at init and after training."""
    slopes = result["slopes"]
    blocks = [v["update"] for name, v in slopes.items() if ".blocks." in f".{name}"]
    row = {"blocks_update_mean": sum(blocks) / len(blocks), "blocks_update_max": max(blocks, key=abs)}
    out = "E" if "E" in slopes else "logits"
    row[f"{out}_after"] = slopes[out]["after"]
    if "dE/dy" in slopes:
        row["dEdy_init"] = slopes["dE/dy"]["init"]
        row["dEdy_after"] = slopes["dE/dy"]["after"]
    return row


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        widths = result["widths"]
        for layer in result["slopes"]:
            sizes = [result["per_width"][w][layer]["update"] for w in widths]
            ax.plot(widths, sizes, marker="o", lw=1, alpha=0.8, label=layer.replace("energy_model.", ""))
        s = result["setting"]
        ax.set(xscale="log", yscale="log", xlabel="width", title=f"{s['kind']} {s['parametrization']}: "
               f"|update| after {s['steps']} steps")
    axes[0][0].set_ylabel("RMS of the output's change")
    axes[0][-1].legend(fontsize=5, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The candidate update's two regimes: alpha as ebt_think.yaml (the quickstart's) starts it, where one step moves
# a logit by a few units, and as the S1 recipe (the reference's default) does, where a step moves logits by
# hundreds and the next softmax is one-hot: the first is the regime ebt/parametrization.py's derivation is about.
CANDIDATE_REGIMES = {"alpha 5 (ebt_think)": {"alpha_init": 5.0, "alpha_lr_mult": 10.0},
                     "alpha 500 (S1)": {"alpha_init": 500.0, "alpha_lr_mult": 1500.0}}


def candidate_sweep(widths: list[int], steps: int, seeds: list[int], lr: float) -> dict:
    """|candidate update| after `steps` steps across widths, per regime, parametrization and seed: its slope
    against width and its spread (largest / smallest over the widths)."""
    rows = []
    for regime, thinking in CANDIDATE_REGIMES.items():
        for parametrization in ("sp", "mup"):
            for seed in seeds:
                setting = Setting(kind="ebt", parametrization=parametrization, base_dim=min(widths), steps=steps,
                                  lr=lr, seed=seed, model={"thinking": thinking})
                measured = [measure(setting, w) for w in widths]
                per_width = [m["candidate update"]["after"] for m in measured]
                alphas = [m["alpha"]["after"] for m in measured]
                rows.append({"regime": regime, "parametrization": parametrization, "seed": seed,
                             "sizes": per_width, "slope": slope(widths, per_width),
                             "spread": max(per_width) / min(per_width), "alpha_after": alphas})
                print(f"{regime:22s} {parametrization:4s} seed {seed}: slope {rows[-1]['slope']:+.2f}, spread "
                      f"{rows[-1]['spread']:.2f}x, sizes " + " ".join(f"{s:.3g}" for s in per_width)
                      + ", alpha after " + " ".join(f"{a:.3g}" for a in alphas), flush=True)
    return {"widths": widths, "steps": steps, "seeds": seeds, "lr": lr, "rows": rows}


def _candidate_table(result: dict, wall_s: float, loads: tuple[float, float]) -> str:
    import statistics

    lines = [f"## Candidate update across widths (`python -m benchmarks.coord_check --candidate-update`): widths "
             f"{', '.join(map(str, result['widths']))}, {result['steps']} AdamW steps at LR {result['lr']:g}, seeds "
             f"{', '.join(map(str, result['seeds']))}, the coordinate check's model and batch",
             "",
             f"RMS of the logit change one MCMC step makes at fixed probe candidates after training (alpha x dE/dx, "
             f"x = softmax(y), less its vocabulary mean), per seed. {wall_s:.0f} s wall, load {loads[0]:.1f} -> "
             f"{loads[1]:.1f}, 1 thread.",
             "",
             "| regime | parametrization | slope per seed (0: flat) | mean slope | spread over widths per seed "
             "(largest / smallest) | alpha after training, smallest - largest over widths and seeds |",
             "|---|---|---|---|---|---|"]
    for regime in CANDIDATE_REGIMES:
        for parametrization in ("sp", "mup"):
            rows = [r for r in result["rows"] if r["regime"] == regime and r["parametrization"] == parametrization]
            slopes, spreads = [r["slope"] for r in rows], [r["spread"] for r in rows]
            lines.append(f"| {regime} | {'μP' if parametrization == 'mup' else 'SP'} | "
                         f"{', '.join(f'{s:+.2f}' for s in slopes)} | {statistics.mean(slopes):+.2f} | "
                         f"{', '.join(f'{s:.1f}x' for s in spreads)} | "
                         f"{min(min(r['alpha_after']) for r in rows):.3g} - "
                         f"{max(max(r['alpha_after']) for r in rows):.3g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=None, help="AdamW steps (default 10; 100 with --candidate-update)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--candidate-update", action="store_true",
                        help="the EBT's candidate update across widths instead: both alpha regimes, SP and μP, "
                             "--seeds (default steps 100)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    start, load = time.time(), __import__("os").getloadavg()[0]
    if args.candidate_update:
        from benchmarks.common import write_results

        result = candidate_sweep(args.widths, args.steps or 100, args.seeds, args.lr)
        loads = (load, __import__("os").getloadavg()[0])
        result.update(wall_s=time.time() - start, load_before=loads[0], load_after=loads[1])
        table = _candidate_table(result, result["wall_s"], loads)
        print(table)
        print(f"wrote {write_results('coord_check_candidate', result, table)}")
        return
    results = []
    for kind in ("ebt", "transformer"):
        for parametrization in ("sp", "mup"):
            setting = Setting(kind=kind, parametrization=parametrization, base_dim=min(args.widths),
                              steps=args.steps or 10, lr=args.lr)
            result = sweep(setting, args.widths)
            results.append(result)
            summary_row = summarize(result)
            results[-1]["summary"] = summary_row
            print(f"{kind:12s} {parametrization:4s} " + "  ".join(f"{k} {v:+.2f}" for k, v in summary_row.items()),
                  flush=True)
    summary = {"results": results, "wall_s": time.time() - start, "load_before": load,
               "load_after": __import__("os").getloadavg()[0], "torch_threads": torch.get_num_threads()}
    (args.out / "coord_check.json").write_text(json.dumps(summary, indent=1))
    _plot(results, args.out / "coord_check.png")
    print(f"wrote {args.out / 'coord_check.json'} and coord_check.png ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
