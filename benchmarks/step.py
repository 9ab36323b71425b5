"""One training step of EBT (K=2) against one of Transformer++, measured in the same run.

Two EBTs: the paper's S1 recipe (configs/recipes/ebt_s1.yaml: time_embed, probability-space update, detached
steps) and this project's earlier default (configs/recipes/ebt_logits.yaml with the default variant: logit-space
update, real stream cached across steps). Defaults follow issue 2: xxs, context 256, batch 8, vocab 8192, fp32,
2 threads, median of 5 timed steps after 2 warm-ups. Every step is a real optimizer step on a fixed batch, so
the timed steps come after the candidates have sharpened (where unflushed denormals would slow an EBT step down
several-fold). Each model runs in its own process so that peak RSS is its own.

    python -m benchmarks.step            # both, writes benchmarks/results/step.json and the README table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.common import add_workload_args, child_allocator, peak_rss_mb, run_isolated, write_results

# --recipe: the model keys of a configs/recipes file (and the variant) on top of the size table.
RECIPES = {"s1": ("ebt_s1.yaml", None), "logits": ("ebt_logits.yaml", "default")}


def recipe_config(args: argparse.Namespace):
    from pathlib import Path

    from launch.config import load_config

    name, variant = RECIPES[args.recipe]
    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / name
    overrides = [f"model.size={args.size}", f"model.vocab_size={args.vocab}", f"model.context_length={args.context}",
                 f"model.mcmc_steps={args.mcmc_steps}", "model.kind=ebt",
                 *([f"model.variant={variant}"] if variant else [])]
    return load_config(path, overrides).model


def measure_one(args: argparse.Namespace) -> dict:
    from ebt import ModelConfig, build_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    if args.kind == "ebt":
        cfg = recipe_config(args)
    else:
        cfg = ModelConfig.from_size(args.size, kind=args.kind, vocab_size=args.vocab, context_length=args.context)
    model = build_model(cfg).train()
    alpha = [p for n, p in model.named_parameters() if "alpha" in n]
    rest = [p for n, p in model.named_parameters() if "alpha" not in n]
    groups = [{"params": rest}]
    if alpha:
        groups.append({"params": alpha, "lr": 1.2e-3 * cfg.alpha_lr_mult})
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
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure_one(args)))
        return
    skip = ("kind", "keep_denormals", "recipe")
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
    shared += ["--keep-denormals"] if args.keep_denormals else []
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


if __name__ == "__main__":
    main()
