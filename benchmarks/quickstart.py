"""What the README's quickstart gives on a fresh machine: validation perplexity and wall time of
`ebt train configs/train/quickstart.yaml`, each run from nothing (a fresh data cache and runs dir, so data
preparation is included), at 1 and 2 threads and on glibc's allocator and tcmalloc.

The perplexity differs between these runs only through floating-point reduction order (threads change the BLAS's
blocking; the allocator changes nothing numerically and is a control), so its spread is what a user should expect
between two correct installs. Runs are sequential, one at a time, with the load average recorded before each.

    python -m benchmarks.quickstart          # writes benchmarks/results/quickstart.json and the README table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import BENCH_DIR, write_results

REPO = BENCH_DIR.parent
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"
FINAL = re.compile(r"validation perplexity: ([0-9.]+) \(loss ([0-9.]+)\)")


def one_run(threads: int, allocator: str) -> dict:
    """`ebt train` on the quickstart exactly as the README runs it, in an empty directory."""
    with tempfile.TemporaryDirectory(prefix="ebt-quickstart-") as work:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), EBT_CPU_ALLOCATOR=allocator,
                   PYTHONPATH=str(REPO), WANDB_MODE="offline")
        env.pop("EBT_ALLOCATOR_REEXEC", None)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(QUICKSTART), "logging.progress=false"],
                              cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"quickstart ({threads} threads, {allocator}) failed:\n{done.stderr[-3000:]}")
        found = FINAL.search(done.stdout)
        if found is None:
            raise RuntimeError(f"no final line in:\n{done.stdout[-2000:]}")
        return {"threads": threads, "allocator": allocator, "val_ppl": float(found[1]), "val_loss": float(found[2]),
                "wall_s": round(wall, 1), "load_before": round(load, 2)}


def table(rows: list[dict]) -> str:
    ppls = [r["val_ppl"] for r in rows]
    lines = ["## Quickstart from nothing (`python -m benchmarks.quickstart`): `ebt train configs/train/quickstart.yaml`"
             " in an empty directory (data preparation included), 300 steps", "",
             "| threads | allocator | val ppl | wall (s) | wall / tcmalloc at 2 threads | load before |",
             "|---|---|---|---|---|---|"]
    base = next((r["wall_s"] for r in rows if r["threads"] == 2 and r["allocator"] == "tcmalloc"), None)
    for r in rows:
        ratio = f"{r['wall_s'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {r['threads']} | {r['allocator']} | {r['val_ppl']:.3f} | {r['wall_s']:.0f} | {ratio} | "
                     f"{r['load_before']} |")
    lines += ["", f"Perplexity spread over these runs: {min(ppls):.3f} to {max(ppls):.3f} "
              f"({100 * (max(ppls) - min(ppls)) / min(ppls):.1f}% of the lowest)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="2:tcmalloc,2:system,1:system,1:tcmalloc",
                        help="THREADS:ALLOCATOR pairs, in the order run (system: glibc's allocator)")
    args = parser.parse_args(argv)
    rows = []
    for pair in args.runs.split(","):
        threads, allocator = pair.split(":")
        rows.append(one_run(int(threads), allocator))
        print(json.dumps(rows[-1]), flush=True)
        # After every run: the results so far are kept if a later run is stopped.
        write_results("quickstart", {"rows": rows, "python": sys.version.split()[0]}, table(rows))


if __name__ == "__main__":
    main()
