"""Shared helpers for benchmarks: isolated child processes, peak RSS and README table updates."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from launch.metrics import peak_rss_mb  # noqa: F401  (re-exported: one definition for trainer and benchmarks)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def current_rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def child_allocator(choice: str = "auto") -> tuple[str, dict[str, str]]:
    """The host allocator `ebt train` would run on (launch/allocator.py) and the environment that gives a child
    process the same: benchmarks measure what training does. EBT_CPU_ALLOCATOR=system measures glibc."""
    from launch.allocator import effective_choice, preload_env, resolve

    name, path = resolve(effective_choice(choice))
    env = dict(os.environ)
    return name, (preload_env(path, env) if path else env)


def run_isolated(module_args: list[str], allocator: str = "auto", tree: Path | None = None,
                 script: Path | None = None) -> dict:
    """Run `python -m <module_args>` in a fresh process (so peak RSS is its own) on the training allocator and
    parse its last JSON line.

    tree: another checkout of this repository to run the module from (a before/after comparison); `python -m`
    puts the working directory first on sys.path, so its packages shadow the installed ones.
    script: run this file with `module_args` as its arguments instead (this tree's harness against `tree`'s
    packages)."""
    env = child_allocator(allocator)[1]
    if tree is not None:
        env = {**env, "PYTHONPATH": str(tree)}
    command = [str(script), *module_args] if script is not None else ["-m", *module_args]
    completed = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, cwd=tree or BENCH_DIR.parent,
        check=False, env=env,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(module_args)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict, table: str) -> Path:
    """Save JSON under benchmarks/results/ and replace this benchmark's section of benchmarks/README.md."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    readme = BENCH_DIR / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{table.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    readme.write_text(text)
    return path


def add_workload_args(
    parser: argparse.ArgumentParser,
    *,
    size: str = "xxs",
    context: int = 256,
    vocab: int = 8192,
    batch: int = 8,
    mcmc_steps: int = 2,
) -> None:
    """The model and batch a training-step benchmark measures; defaults are issue 2's xxs workload."""
    parser.add_argument("--size", default=size)
    parser.add_argument("--context", type=int, default=context)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--mcmc-steps", type=int, default=mcmc_steps)
