"""One training step of EBT (K=2) against one of Transformer++, measured in the same run.

Two EBTs: the paper's S1 recipe (configs/recipes/ebt_s1.yaml: time_embed, probability-space update, detached
steps) and this project's earlier default (configs/recipes/ebt_logits.yaml with the default variant: logit-space
update, real stream cached across steps). Defaults follow issue 2: xxs, context 256, batch 8, vocab 8192, fp32,
2 threads, median of 5 timed steps after 2 warm-ups. Every step is a real optimizer step on a fixed batch, so
the timed steps come after the candidates have sharpened (where unflushed denormals would slow an EBT step down
several-fold). Each model runs in its own process so that peak RSS is its own.

    python -m benchmarks.step            # both, writes benchmarks/results/step.json and the README table
    python -m benchmarks.step --baseline-tree /tmp/before   # this tree against another checkout, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_workload_args, child_allocator, peak_rss_mb, run_isolated, write_results

# --recipe: the model keys of a configs/recipes file (and the variant) on top of the size table.
RECIPES = {"s1": ("ebt_s1.yaml", None), "logits": ("ebt_logits.yaml", "default")}
# --baseline-tree's models: name -> this module's flags for one measurement.
BEFORE_AFTER_MODELS = {"transformer": ["--kind=transformer"], "ebt_logits": ["--kind=ebt", "--recipe=logits"],
                       "ebt_s1": ["--kind=ebt", "--recipe=s1"]}


def recipe_config(args: argparse.Namespace):
    from launch.config import load_config

    name, variant = RECIPES[args.recipe]
    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / name
    overrides = [f"model.size={args.size}", f"model.architecture.vocab_size={args.vocab}",
                 f"model.architecture.context_length={args.context}",
                 f"model.thinking.mcmc_steps={args.mcmc_steps}", "model.kind=ebt",
                 *([f"model.architecture.variant={variant}"] if variant else [])]
    return load_config(path, overrides).model


def measure_one(args: argparse.Namespace) -> dict:
    from ebt import ModelConfig, build_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    if args.kind == "ebt":
        cfg = recipe_config(args)
    else:
        cfg = ModelConfig.from_size(args.size, kind=args.kind,
                                    architecture={"vocab_size": args.vocab, "context_length": args.context})
    model = build_model(cfg).train()
    alpha = [p for n, p in model.named_parameters() if "alpha" in n]
    rest = [p for n, p in model.named_parameters() if "alpha" not in n]
    groups = [{"params": rest}]
    if alpha:
        groups.append({"params": alpha, "lr": 1.2e-3 * cfg.thinking.alpha_lr_mult})
    optimizer = torch.optim.AdamW(groups, lr=1.2e-3, weight_decay=0.01)
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1))
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss, _ = model.loss(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    step_s = statistics.median(times[args.warmup :])
    return {
        "kind": args.kind,
        "recipe": args.recipe if args.kind == "ebt" else None,
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": args.batch * args.context / step_s,
        "peak_rss_mb": peak_rss_mb(),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--keep-denormals", action="store_true")
    parser.add_argument("--kind", choices=["ebt", "transformer"], help="measure one kind in this process")
    parser.add_argument("--recipe", choices=list(RECIPES), default="s1", help="the EBT's recipe (with --kind ebt)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of an earlier commit (git worktree add DIR REV): measure both, interleaved, "
                             "and write results/step_before_after.json")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline-tree: before/after pairs per model")
    parser.add_argument("--models", nargs="+", choices=list(BEFORE_AFTER_MODELS), default=list(BEFORE_AFTER_MODELS),
                        help="with --baseline-tree: which models to compare (more rounds for a noisy one)")
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure_one(args)))
        return
    skip = ("kind", "keep_denormals", "recipe", "baseline_tree", "rounds", "models")
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
    shared += ["--keep-denormals"] if args.keep_denormals else []
    if args.baseline_tree is not None:
        before_after(args, shared)
        return
    tpp = run_isolated(["benchmarks.step", *shared, "--kind=transformer"])
    ebt = run_isolated(["benchmarks.step", *shared, "--kind=ebt", "--recipe=logits"])
    s1 = run_isolated(["benchmarks.step", *shared, "--kind=ebt", "--recipe=s1"])
    load = os.getloadavg()
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("kind", "recipe")},
        "torch": torch.__version__,
        "load_average": load,
        "transformer": tpp,
        "ebt": ebt,
        "ebt_s1": s1,
        "ebt_over_transformer_step": ebt["step_s"] / tpp["step_s"],
        "ebt_over_transformer_memory": ebt["peak_rss_mb"] / tpp["peak_rss_mb"],
        "s1_over_transformer_step": s1["step_s"] / tpp["step_s"],
        "s1_over_transformer_memory": s1["peak_rss_mb"] / tpp["peak_rss_mb"],
        "targets": {"step_ratio": 5.5, "memory_ratio": 3.0},
    }
    allocator = child_allocator()[0]
    payload["allocator"] = allocator
    table = "\n".join([
        f"## Training step (`python -m benchmarks.step`): {args.size}, context {args.context}, batch {args.batch}, "
        f"vocab {args.vocab}, fp32, {args.threads} threads, K={args.mcmc_steps}, host allocator {allocator}",
        "",
        f"Load average after the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min, 2 cores).",
        "",
        "| model | median step (s) | tokens/s | peak RSS (MB) | step / Transformer++ | memory / Transformer++ |",
        "|---|---|---|---|---|---|",
        f"| Transformer++ | {tpp['step_s']:.2f} | {tpp['tokens_per_s']:.0f} | {tpp['peak_rss_mb']:.0f} | 1 | 1 |",
        f"| EBT, earlier default (ebt_logits, default variant) | {ebt['step_s']:.2f} | {ebt['tokens_per_s']:.0f} | "
        f"{ebt['peak_rss_mb']:.0f} | **{payload['ebt_over_transformer_step']:.2f}x** | "
        f"**{payload['ebt_over_transformer_memory']:.2f}x** |",
        f"| EBT, S1 recipe (ebt_s1: time_embed, probs update, detached steps) | {s1['step_s']:.2f} | "
        f"{s1['tokens_per_s']:.0f} | {s1['peak_rss_mb']:.0f} | **{payload['s1_over_transformer_step']:.2f}x** | "
        f"**{payload['s1_over_transformer_memory']:.2f}x** |",
        "",
        "Targets (issue 2): step <= 5.5x, memory <= 3x Transformer++'s without a memory policy. time_embed puts a "
        "step token in the real stream, so S1 recomputes the real stream at every step.",
    ])
    path = write_results("step", payload, table)
    print(table)
    print(f"wrote {path}")


def before_after(args: argparse.Namespace, shared: list[str]) -> None:
    """The same three step measurements from this tree and from `--baseline-tree`, in one run.

    Rounds alternate the order (before-after, then after-before, ...) so that a drift in the machine's load
    falls on both sides; each side's step time is the median over its rounds' medians."""
    import subprocess

    def commit(tree: Path) -> str:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")

    models = {name: BEFORE_AFTER_MODELS[name] for name in args.models}
    here = Path(__file__).resolve().parents[1]
    sides = {"before": args.baseline_tree.resolve(), "after": here}
    runs: dict[str, dict[str, list[dict]]] = {name: {"before": [], "after": []} for name in models}
    for name, flags in models.items():
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for side in order:
                tree = sides[side] if side == "before" else None
                runs[name][side].append(run_isolated(["benchmarks.step", *shared, *flags], tree=tree))
    load = os.getloadavg()
    summary = {}
    for name, sides_runs in runs.items():
        step = {side: statistics.median(r["step_s"] for r in rs) for side, rs in sides_runs.items()}
        rss = {side: statistics.median(r["peak_rss_mb"] for r in rs) for side, rs in sides_runs.items()}
        summary[name] = {"before_step_s": step["before"], "after_step_s": step["after"],
                         "after_over_before_step": step["after"] / step["before"],
                         "before_peak_rss_mb": rss["before"], "after_peak_rss_mb": rss["after"]}
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("kind", "recipe")},
               "before": commit(sides["before"]), "after": commit(here), "torch": torch.__version__,
               "load_average": load, "summary": summary, "runs": runs, "allocator": child_allocator()[0]}
    rows = [f"| {name} | {s['before_step_s']:.3f} | {s['after_step_s']:.3f} | **{s['after_over_before_step']:.3f}** | "
            f"{s['before_peak_rss_mb']:.0f} / {s['after_peak_rss_mb']:.0f} |" for name, s in summary.items()]
    table = "\n".join([
        f"## Step time before and after a change (`python -m benchmarks.step --baseline-tree DIR`): "
        f"{payload['before']} -> {payload['after']}",
        "",
        f"{args.size}, context {args.context}, batch {args.batch}, vocab {args.vocab}, fp32, {args.threads} threads, "
        f"K={args.mcmc_steps}, {args.rounds} interleaved rounds per side, median of {args.steps} steps each. "
        f"Load average after the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min, 2 cores).",
        "",
        "| model | before: median step (s) | after: median step (s) | after / before | peak RSS before / after (MB) |",
        "|---|---|---|---|---|",
        *rows,
    ])
    # A subset (--models) gets its own result and README section, beside the full comparison.
    name = "step_before_after" + ("" if list(models) == list(BEFORE_AFTER_MODELS) else "_" + "_".join(models))
    path = write_results(name, payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
