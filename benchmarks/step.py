"""One training step of EBT (default, K=2) against one of Transformer++, measured in the same run.

Defaults follow issue 2: xxs, context 256, batch 8, vocab 8192, fp32, 2 threads, median of 5 timed steps after
2 warm-ups. Every step is a real optimizer step on a fixed batch, so the timed steps come after the candidates
have sharpened (where unflushed denormals would slow an EBT step down several-fold). Each model runs in its own
process so that peak RSS is its own.

    python -m benchmarks.step            # both, writes benchmarks/results/step.json and the README table
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import add_workload_args, child_allocator, peak_rss_mb, run_isolated, write_results


def measure_one(args: argparse.Namespace) -> dict:
    from ebt import ModelConfig, build_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    torch.manual_seed(0)
    cfg = ModelConfig.from_size(
        args.size, kind=args.kind, vocab_size=args.vocab, context_length=args.context, mcmc_steps=args.mcmc_steps
    )
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
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure_one(args)))
        return
    shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("kind", "keep_denormals")]
    shared += ["--keep-denormals"] if args.keep_denormals else []
    tpp = run_isolated(["benchmarks.step", *shared, "--kind=transformer"])
    ebt = run_isolated(["benchmarks.step", *shared, "--kind=ebt"])
    payload = {
        "config": {k: v for k, v in vars(args).items() if k != "kind"},
        "torch": torch.__version__,
        "transformer": tpp,
        "ebt": ebt,
        "ebt_over_transformer_step": ebt["step_s"] / tpp["step_s"],
        "ebt_over_transformer_memory": ebt["peak_rss_mb"] / tpp["peak_rss_mb"],
        "targets": {"step_ratio": 5.5, "memory_ratio": 3.0},
    }
    allocator = child_allocator()[0]
    payload["allocator"] = allocator
    table = "\n".join([
        f"## Training step (`python -m benchmarks.step`): {args.size}, context {args.context}, batch {args.batch}, "
        f"vocab {args.vocab}, fp32, {args.threads} threads, K={args.mcmc_steps}, host allocator {allocator}",
        "",
        "| model | median step (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|",
        f"| Transformer++ | {tpp['step_s']:.2f} | {tpp['tokens_per_s']:.0f} | {tpp['peak_rss_mb']:.0f} |",
        f"| EBT (default) | {ebt['step_s']:.2f} | {ebt['tokens_per_s']:.0f} | {ebt['peak_rss_mb']:.0f} |",
        f"| **EBT / Transformer++** | **{payload['ebt_over_transformer_step']:.2f}x** (target <= 5.5x) | | "
        f"**{payload['ebt_over_transformer_memory']:.2f}x** (target <= 3x) |",
    ])
    path = write_results("step", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
