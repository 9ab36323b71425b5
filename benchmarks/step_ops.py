"""Is a training step the same work in two trees? Operator counts and CPU time under torch.profiler.

Step times on a shared 2-core machine drift by more than a few percent between runs (benchmarks/README.md,
"Step time before and after a change"), so a small slowdown cannot be told from timings alone; the operators a
step runs, and how often, do not drift. Each tree runs its own `benchmarks.step` measurement (same model, shapes,
seed and step count) in its own process, the whole run under torch.profiler: model build, warm-up and timed
steps. The comparison lists the (operator, input shapes) pairs whose call counts differ, and both trees'
self-CPU totals.

    python -m benchmarks.step_ops --baseline-tree /tmp/before                 # all three models
    python -m benchmarks.step_ops --baseline-tree /tmp/before --models ebt_s1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path


def child(flags: list[str], steps: int) -> None:
    """Run this tree's `python -m benchmarks.step <flags>` in-process under the profiler; print the op table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.argv = ["benchmarks.step", *flags, f"--steps={steps}", "--warmup=2", "--threads=2"]
    with (profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
          contextlib.redirect_stdout(io.StringIO())):
        runpy.run_module("benchmarks.step", run_name="__main__")
    # Keyed by operator AND input shapes: the same op on a larger tensor is different work.
    ops = {f"{event.key} {event.input_shapes}": [event.count, event.self_cpu_time_total / 1e6]
           for event in prof.key_averages(group_by_input_shape=True)}
    print(json.dumps({"torch": torch.__version__, "ops": ops}))


def profile_tree(tree: Path, flags: list[str], steps: int) -> dict:
    """The op table of one tree: this file run as a script with the tree first on sys.path, so `benchmarks.step`
    and the packages it measures are that tree's; on the training allocator, as benchmarks.step's own children."""
    from benchmarks.common import run_isolated

    return run_isolated(["--child", *flags, f"--steps={steps}"], tree=tree, script=Path(__file__).resolve())


def compare(before: dict, after: dict) -> dict:
    ops_b, ops_a = before["ops"], after["ops"]
    differing = {op: [ops_b.get(op, [0, 0.0])[0], ops_a.get(op, [0, 0.0])[0]] for op in sorted(set(ops_b) | set(ops_a))
                 if ops_b.get(op, [0])[0] != ops_a.get(op, [0])[0]}
    cpu_b, cpu_a = (sum(v[1] for v in ops.values()) for ops in (ops_b, ops_a))
    return {"distinct_ops": [len(ops_b), len(ops_a)], "calls": [sum(v[0] for v in ops_b.values()),
                                                                sum(v[0] for v in ops_a.values())],
            "differing_counts": differing, "self_cpu_s": [cpu_b, cpu_a], "self_cpu_ratio": cpu_a / cpu_b}


def main() -> None:
    if "--child" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--child", action="store_true")
        parser.add_argument("--steps", type=int)
        args, flags = parser.parse_known_args()
        child(flags, args.steps)
        return
    # Imported here, not at the top: a child runs this file against the other tree's `benchmarks` package.
    from benchmarks.common import write_results
    from benchmarks.step import BEFORE_AFTER_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", type=Path, required=True, help="a checkout of an earlier commit")
    parser.add_argument("--models", nargs="+", choices=list(BEFORE_AFTER_MODELS), default=list(BEFORE_AFTER_MODELS))
    parser.add_argument("--steps", type=int, default=2, help="profiled steps after benchmarks.step's 2 warm-ups")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    results, rows = {}, []
    for name in args.models:
        flags = BEFORE_AFTER_MODELS[name]
        before = profile_tree(args.baseline_tree.resolve(), flags, args.steps)
        after = profile_tree(here, flags, args.steps)
        results[name] = compare(before, after)
        r = results[name]
        shown = ", ".join(f"{op} {b} -> {a}" for op, (b, a) in list(r["differing_counts"].items())[:6]) or "none"
        rows.append(f"| {name} | {r['distinct_ops'][0]} / {r['distinct_ops'][1]} | {r['calls'][0]:,} / "
                    f"{r['calls'][1]:,} | {shown} | {r['self_cpu_s'][0]:.2f} / {r['self_cpu_s'][1]:.2f} | "
                    f"**{r['self_cpu_ratio']:.3f}** |")
        print(rows[-1], flush=True)
    load = os.getloadavg()
    table = "\n".join([
        f"## Step work before and after a change (`python -m benchmarks.step_ops --baseline-tree DIR`): "
        f"{args.steps} profiled steps after 2 warm-ups, the whole `benchmarks.step` run (build included), "
        f"2 threads; load average after: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| model | distinct (op, input shapes) before / after | calls before / after | (op, shapes) whose count "
        "differs (before -> after) "
        "| self CPU s before / after | after / before |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    path = write_results("step_ops", {"baseline_tree": str(args.baseline_tree), "steps": args.steps,
                                      "load_average": load, "models": results}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
