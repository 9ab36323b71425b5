"""End-to-end trainer throughput of the quickstart config against the pure step time, with 1 and 2 processes.

End to end = `ebt train` itself (data loading, metrics, logging, evaluation and checkpoint cadence, DDP), read
from metrics.jsonl: training tokens between the first and the last logged row over the wall time between them
(start-up and the first log window, which holds the warm-up, are left out). Pure = `benchmarks/step.py`'s loop
on the same model and micro-batch (one fixed batch, plain AdamW, nothing else), in as many processes and threads
as the trainer run uses, run at the same time. Overhead = 1 - end-to-end / pure; target <= 5%. The trainer also
reports, per metrics row, the share of wall time spent computing steps (compute_frac), which gives the overhead
within the same time window; on a shared machine whose load drifts that is the number to trust.

    python -m benchmarks.train            # writes benchmarks/results/train.json and the README table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, child_allocator, write_results

REPO = BENCH_DIR.parent
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"


def pure_tokens_per_s(cfg, nproc: int, threads: int, steps: int) -> dict:
    """benchmarks.step on the quickstart model, `nproc` copies at once (as DDP ranks would share the cores)."""
    m, t = cfg.model, cfg.trainer
    args = [sys.executable, "-m", "benchmarks.step", f"--kind={m.kind}", f"--size={m.size}",
            f"--context={m.architecture.context_length}", f"--batch={t.micro_batch_size}",
            f"--vocab={m.architecture.vocab_size}",
            f"--mcmc-steps={m.thinking.mcmc_steps}", f"--threads={threads}", f"--steps={steps}", "--warmup=3",
            *(["--recipe=logits"] if m.kind == "ebt" else [])]  # the quickstart's thinking loop
    env = child_allocator()[1]  # the allocator `ebt train` runs on, or the comparison measures allocators
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env) for _ in range(nproc)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("benchmarks.step failed")
        results.append(json.loads(out.strip().splitlines()[-1]))
    step_s = max(r["step_s"] for r in results)  # a synchronous DDP step waits for the slowest rank
    return {"step_s": step_s, "tokens_per_s": nproc * t.micro_batch_size * m.architecture.context_length / step_s}


def end_to_end(work: Path, nproc: int, steps: int, cache_dir: str) -> dict:
    name = f"bench-{nproc}"
    cmd = [sys.executable, "-m", "launch.cli", "train", str(QUICKSTART), f"name={name}",
           f"trainer.max_steps={steps}", f"data.cache_dir={cache_dir}", "logging.progress=false",
           "logging.wandb=false", f"--nproc={nproc}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ebt train failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not r.get("final")]
    first, last = rows[0], rows[-1]
    tps = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    # In-run overhead: wall-weighted share of each window not spent computing steps (same windows, same load).
    walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
    compute = sum(w * r["compute_frac"] for w, r in zip(walls, rows[1:], strict=False))
    data = sum(w * r["data_frac"] for w, r in zip(walls, rows[1:], strict=False))
    return {"tokens_per_s": tps, "wall_s": wall, "steps": last["step"], "final_loss": last["loss"],
            "in_run_overhead": 1.0 - compute / sum(walls), "data_share": data / sum(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 110 steps: the measured window (rows 10..110) holds one evaluation and one checkpoint per 100 steps, the
    # quickstart's own cadence.
    parser.add_argument("--steps", type=int, default=110, help="trainer steps per end-to-end run")
    parser.add_argument("--pure-steps", type=int, default=20)
    parser.add_argument("--procs", default="1,2")
    args = parser.parse_args()

    from data_pipeline import prepare_if_needed
    from launch.config import load_config

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ebt-bench-train-") as tmp:
        work = Path(tmp)
        cfg = load_config(QUICKSTART, [f"data.cache_dir={work / 'data'}"])
        cfg.data.progress = False
        prepare_if_needed(cfg.data)  # not timed: both sides read the same prepared shards
        rows = []
        for nproc in [int(p) for p in args.procs.split(",")]:
            threads = max(1, cores // nproc)
            e2e = end_to_end(work, nproc, args.steps, str(work / "data"))
            pure = pure_tokens_per_s(cfg, nproc, threads, args.pure_steps)
            rows.append({"processes": nproc, "threads_per_process": threads, "end_to_end": e2e, "pure_step": pure,
                         "overhead": 1.0 - e2e["tokens_per_s"] / pure["tokens_per_s"],
                         "load_average": os.getloadavg()[0]})
    m, t = cfg.model, cfg.trainer
    payload = {"config": str(QUICKSTART.relative_to(REPO)), "steps": args.steps, "rows": rows, "target_overhead": 0.05,
               "model": {"kind": m.kind, "size": m.size, "context": m.architecture.context_length,
                         "vocab": m.architecture.vocab_size,
                         "micro_batch": t.micro_batch_size}}
    lines = [
        f"## Trainer end to end (`python -m benchmarks.train`): quickstart ({m.kind} {m.size}, context "
        f"{m.architecture.context_length}, vocab {m.architecture.vocab_size}, micro-batch {t.micro_batch_size}), "
        f"{args.steps} steps",
        "",
        "End to end = `ebt train` with its data loading, metrics, evaluation and checkpoint cadence, from "
        "metrics.jsonl; pure = `benchmarks/step.py` on the same model and batch in the same number of processes. "
        "Target: overhead <= 5%.",
        "",
        "In-run overhead = share of the trainer's own wall time (same windows) not spent computing steps; it is "
        "immune to the machine's load drifting between the two measurements, which dominates the other column "
        "on this shared machine. With several processes, pure runs them independently: the vs-pure gap then also "
        "holds DDP's gradient all-reduce over gloo, part of the step, which the in-run column counts as compute. "
        "Both sides run on the training allocator.",
        "",
        "| processes | threads each | end-to-end tokens/s | pure step tokens/s | overhead vs pure | in-run overhead "
        "| of which data | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e2e = r["end_to_end"]
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {e2e['tokens_per_s']:.0f} | "
                     f"{r['pure_step']['tokens_per_s']:.0f} | {100 * r['overhead']:.1f}% | "
                     f"{100 * e2e['in_run_overhead']:.1f}% | {100 * e2e['data_share']:.2f}% | "
                     f"{r['load_average']:.1f} |")
    table = "\n".join(lines)
    path = write_results("train", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
