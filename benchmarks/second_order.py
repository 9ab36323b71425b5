"""Second-order memory and speed: every checkpointing policy against Transformer++ in one run (issue 7).

Defaults: xxs, context 256, batch 8, vocab 8192, fp32, denormals flushed, K=2, plus K=4 and K=8 for the
policies that scale. Each point runs in its own process (peak RSS is the process's own) with ONE thread, and
step time is reported both as wall time and as the process's CPU time: the machine is shared, and CPU time of
a single-threaded process is far less sensitive to other load than wall time, so the ratios use CPU time.
Every step is a real AdamW step on a fixed batch (candidates sharpen as in training).

    python -m benchmarks.second_order                  # full run, writes results/second_order.json + README
    python -m benchmarks.second_order --quick          # K=2 only, fewer steps
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
    from ebt.checkpointing import apply_checkpointing

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    kind = "transformer" if args.policy == "transformer" else "ebt"
    # "policy[/chunk][:impl]": impl "" (RematerialisedStep), generic, jvp or compiled; chunk: the recompute chunk.
    spec, _, impl = args.policy.partition(":")
    policy, _, chunk = spec.partition("/")
    policy = "none" if kind == "transformer" else policy
    cfg = ModelConfig.from_size(args.size, kind=kind,
                                architecture={"vocab_size": args.vocab, "context_length": args.context},
                                thinking={"mcmc_steps": args.mcmc_steps})
    model = build_model(cfg).train()
    if kind == "ebt":
        apply_checkpointing(model, policy, int(chunk or 0))
    compile_s = None
    if impl == "generic":
        from benchmarks.experimental.step_runners import use_step_impl

        use_step_impl(model, "generic")
    elif impl == "jvp":
        from benchmarks.experimental.compiled import make_jvp_step_runner
        from benchmarks.experimental.step_runners import use_step_runner

        use_step_runner(model, make_jvp_step_runner(model.energy_model))
    elif impl == "compiled":
        from benchmarks.experimental.compiled import enable_compiled_inner_gradient

        enable_compiled_inner_gradient(model)
    alpha = [p for n, p in model.named_parameters() if "alpha" in n]
    rest = [p for n, p in model.named_parameters() if "alpha" not in n]
    groups = [{"params": rest}] + ([{"params": alpha, "lr": 1.2e-3 * cfg.thinking.alpha_lr_mult}] if alpha else [])
    optimizer = torch.optim.AdamW(groups, lr=1.2e-3, weight_decay=0.01)
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1))
    wall, cpu, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, _ = model.loss(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(float(loss.detach()))
    if impl == "compiled":
        compile_s = wall[0] - statistics.median(wall[args.warmup :])
    return {
        "policy": args.policy,
        "mcmc_steps": args.mcmc_steps if kind == "ebt" else None,
        "step_s": statistics.median(wall[args.warmup :]),
        "cpu_s": statistics.median(cpu[args.warmup :]),
        "step_times_s": wall,
        "cpu_times_s": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "losses": losses,
        "first_compile_s": compile_s,
    }


def plan(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(policy, K, timed steps) points; K=4/8 get fewer steps (each EBT step costs seconds on 2 shared cores).

    "policy/n" sets remat_chunk=n; ":generic" is the torch.utils.checkpoint recipe, ":jvp" the
    forward-over-reverse step, ":compiled" the compiled functional inner gradient (--experimental)."""
    k2 = ["transformer", "none", "block", "mcmc_step", "mcmc_step:generic", "block+mcmc_step", "mcmc_step/2",
          "mcmc_step/1", "block+mcmc_step/2"]
    if args.experimental:
        k2 += ["mcmc_step:jvp", "none:compiled"]
    points = [(p, 2, args.steps) for p in k2]
    if not args.quick:
        few = max(1, args.steps // 2)
        points += [("none", 4, few), ("mcmc_step/2", 4, few), ("mcmc_step/2", 8, 1)]
    return points


def label(policy: str) -> str:
    spec, _, impl = policy.partition(":")
    name, _, chunk = spec.partition("/")
    if chunk:
        return f"{label(name + (':' + impl if impl else ''))}, remat_chunk={chunk}"
    return {"transformer": "Transformer++", "mcmc_step:generic": "mcmc_step (torch.utils.checkpoint)",
            "mcmc_step": "mcmc_step (RematerialisedStep)",
            "mcmc_step:jvp": "mcmc_step (forward-over-reverse)",
            "none:compiled": "none + compiled inner gradient"}.get(policy, policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="K=2 only")
    parser.add_argument("--experimental", action="store_true",
                        help="also time forward-over-reverse and the compiled inner gradient")
    parser.add_argument("--points", help="comma-separated policies at K=--mcmc-steps instead of the default plan")
    parser.add_argument("--name", default="second_order", help="results/<name>.json and README section")
    parser.add_argument("--policy", help="measure one point in this process")
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(measure_one(args)))
        return
    from fsutil.progress import Progress

    base = [f"--size={args.size}", f"--context={args.context}", f"--batch={args.batch}", f"--vocab={args.vocab}",
            f"--threads={args.threads}", f"--warmup={args.warmup}"]
    results = []
    points = plan(args) if not args.points else [(p, args.mcmc_steps, args.steps) for p in args.points.split(",")]
    with Progress(prefix="benchmarks.second_order: ") as progress:
        task = progress.add("second-order points", len(points), unit="points")
        for policy, steps_k, timed in points:
            row = run_isolated(["benchmarks.second_order", *base, f"--mcmc-steps={steps_k}", f"--steps={timed}",
                                f"--policy={policy}"])
            row["mcmc_steps"] = steps_k if policy != "transformer" else None
            results.append(row)
            progress.advance(task, info=f"{policy} K={steps_k}")
        progress.finish(task)
    payload = summarise(args, results)
    path = write_results(args.name, payload, table(args, payload))
    print(table(args, payload))
    print(f"wrote {path}")


def summarise(args: argparse.Namespace, results: list[dict]) -> dict:
    tpp = next(r for r in results if r["policy"] == "transformer")
    none = next(r for r in results if r["policy"] == "none")
    for r in results:
        r["memory_vs_transformer"] = r["peak_rss_mb"] / tpp["peak_rss_mb"]
        same_k = next((n for n in results if n["policy"] == "none" and n["mcmc_steps"] == r["mcmc_steps"]), None)
        r["cpu_vs_ebt_none"] = r["cpu_s"] / same_k["cpu_s"] if same_k and r["policy"] != "transformer" else None
        r["cpu_vs_ebt_none_k2"] = r["cpu_s"] / none["cpu_s"]
    k2 = [r for r in results if r["mcmc_steps"] == none["mcmc_steps"] and r["policy"] not in ("none", "transformer")]
    fitting = [r for r in k2 if r["memory_vs_transformer"] <= 2.0 and r["cpu_vs_ebt_none"] <= 1.3]
    best = min(k2, key=lambda r: (r["memory_vs_transformer"] > 2.0, r["cpu_vs_ebt_none"] > 1.3,
                                  r["memory_vs_transformer"]))
    return {
        "config": {k: v for k, v in vars(args).items() if k != "policy"},
        "torch": torch.__version__,
        "results": results,
        "best_k2": best["policy"],
        "targets_met": bool(fitting),
        "targets": {"memory_vs_transformer": 2.0, "time_vs_ebt_none": 1.3},
    }


def table(args: argparse.Namespace, payload: dict) -> str:
    command = "python -m benchmarks.second_order"
    if args.name != "second_order":
        command += f" --name {args.name}"
    if args.points:
        command += f" --points {args.points}"
    lines = [
        f"## Second-order memory and speed (`{command}`): {args.size}, context "
        f"{args.context}, batch {args.batch}, vocab {args.vocab}, fp32, denormals flushed, {args.threads} thread "
        f"per process, host allocator {child_allocator()[0]}",
        "",
        "Ratios use CPU time (one thread per process; the shared machine inflates wall time). Targets at K=2: "
        "peak <= 2.0x Transformer++, time <= 1.3x the EBT step without checkpointing.",
        "",
        "| policy | K | CPU s/step | wall s/step | peak RSS (MB) | x Transformer++ memory | x EBT none time (same K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        k = "" if r["mcmc_steps"] is None or r["policy"] == "transformer" else r["mcmc_steps"]
        vs_none = f"{r['cpu_vs_ebt_none']:.2f}x" if r["cpu_vs_ebt_none"] is not None else (
            "" if r["policy"] == "transformer" else "(none not run at this K)")
        lines.append(f"| {label(r['policy'])} | {k} | {r['cpu_s']:.2f} | {r['step_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['memory_vs_transformer']:.2f}x | {vs_none} |")
    for policy in sorted({r["policy"] for r in payload["results"]}):
        rows = sorted((r for r in payload["results"] if r["policy"] == policy and r["mcmc_steps"]),
                      key=lambda r: r["mcmc_steps"])
        if len(rows) > 1 and policy != "none":
            first, last = rows[0], rows[-1]
            slope = (last["peak_rss_mb"] - first["peak_rss_mb"]) / (last["mcmc_steps"] - first["mcmc_steps"])
            k2 = rows[0]["peak_rss_mb"]
            lines.append(f"\n{label(policy)}: peak grows by {slope:.0f} MB per extra MCMC step "
                         f"(K={rows[0]['mcmc_steps']}: {k2:.0f} MB, K={rows[-1]['mcmc_steps']}: "
                         f"{rows[-1]['peak_rss_mb']:.0f} MB); CPU time per step grows about linearly in K.")
    nones = sorted((r for r in payload["results"] if r["policy"] == "none"), key=lambda r: r["mcmc_steps"])
    if len(nones) > 1:
        first, last = nones[0], nones[-1]
        slope = (last["peak_rss_mb"] - first["peak_rss_mb"]) / (last["mcmc_steps"] - first["mcmc_steps"])
        lines.append(f"\nWithout checkpointing the peak grows by {slope:.0f} MB per extra MCMC step.")
    compiled = [r for r in payload["results"] if r.get("first_compile_s") is not None]
    for r in compiled:
        lines.append(f"\nFirst compile of the inner gradient: about {r['first_compile_s']:.0f} s (first step minus "
                     "the median step).")
    verdict = "met" if payload["targets_met"] else "MISSED"
    lines.append(f"\nBest of this run's policies at K=2: **{label(payload['best_k2'])}**; targets {verdict} among "
                 "this run's points.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
