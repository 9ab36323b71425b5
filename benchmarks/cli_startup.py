"""Start-up time of the `ebt` command line: `ebt --help` and `ebt train --help` in fresh processes.

Every command module is imported to build the parser, so one heavy module-level import (torch: ~2 s here) is
paid by every `ebt` invocation, `--help` included. Wall times depend on the machine's load far more than on the
code, so each is reported as a ratio against baselines measured in the same run, interleaved round by round:
`python -c pass` (the interpreter alone) and `python -c "import torch"` (what the CLI cost before issue 15).

    python -m benchmarks.cli_startup [--runs 15] [--before REV]

--before REV also times the CLI of an earlier commit (extracted with `git archive` into a temporary directory).
Which modules the help loads is asserted by tests/launch/test_cli_imports.py; this file only measures time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, write_results

REPO = BENCH_DIR.parent
# What the installed `ebt` console script runs (pyproject.toml: ebt = "launch.cli:main"); -c keeps sys.argv[1:]
# as the command's arguments.
ENTRY = "import sys; from launch.cli import main; sys.exit(main())"
TARGET_S = 0.5  # issue 15: `ebt --help` under 0.5 s on a quiet machine


def _commands(before: Path | None) -> dict[str, tuple[list[str], Path]]:
    """label -> (arguments after the interpreter, directory to run in: its packages shadow the installed ones)."""
    commands: dict[str, tuple[list[str], Path]] = {
        "python -c pass": (["-c", "pass"], REPO),
        'python -c "import torch"': (["-c", "import torch"], REPO),
        "ebt --help": (["-c", ENTRY, "--help"], REPO),
        "ebt train --help": (["-c", ENTRY, "train", "--help"], REPO),
    }
    if before is not None:
        commands[f"ebt --help @ {before.name}"] = (["-c", ENTRY, "--help"], before)
        commands[f"ebt train --help @ {before.name}"] = (["-c", ENTRY, "train", "--help"], before)
    return commands


def _time_once(args: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                               check=False)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} (in {cwd}) exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    return seconds


def measure(runs: int, before: Path | None) -> dict[str, list[float]]:
    """`runs` wall times per command, round-robin so that a change of load shifts every command alike; one
    discarded warm-up round first fills the page cache."""
    commands = _commands(before)
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for round_index in range(runs + 1):
        for label, (args, cwd) in commands.items():
            seconds = _time_once(args, cwd)
            if round_index > 0:
                samples[label].append(seconds)
    return samples


def _extract(rev: str, into: Path) -> Path:
    """The tree of commit `rev` under `into` (git archive: reads objects only, touches no work tree or index)."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", rev], stdout=out, check=True)
    tree = into / rev  # its name labels the rows
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def _table(payload: dict) -> str:
    medians, base, torch_s = payload["median_s"], payload["median_s"]["python -c pass"], \
        payload["median_s"]['python -c "import torch"']
    load_before, load_after = payload["load_average_before"], payload["load_average_after"]
    fmt = " / ".join
    before = f", and the CLI of commit {payload['before']}" if payload["before"] else ""
    lines = [
        f"## CLI start-up (`python -m benchmarks.cli_startup`): median of {payload['runs']} fresh processes per "
        f"command{before}, Python {payload['python']}",
        "",
        f"Load average before the run {fmt(f'{x:.2f}' for x in load_before)}, after it "
        f"{fmt(f'{x:.2f}' for x in load_after)} (1 / 5 / 15 min, {payload['cpu_count']} cores, a shared machine).",
        "",
        "| command | median (s) | x `python -c pass` | x `import torch` |",
        "|---|---|---|---|",
    ]
    for label, seconds in medians.items():
        command, _, rev = label.partition(" @ ")
        cell = f"`{command}`" + (f" at commit {rev}" if rev else "")
        lines.append(f"| {cell} | {seconds:.3f} | {seconds / base:.2f}x | {seconds / torch_s:.2f}x |")
    lines += [
        "",
        f"Target (issue 15): `ebt --help` under {TARGET_S} s on a quiet machine. Command modules import only the "
        "standard library at module level and the heavy packages inside the command that runs "
        "(tests/launch/test_cli_imports.py asserts that no heavy module is loaded by any `--help`).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed processes per command (after one warm-up)")
    parser.add_argument("--before", default=None, metavar="REV", help="also time the CLI of this commit")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ebt-cli-before-") as tmp:
        before_tree = _extract(args.before, Path(tmp)) if args.before else None
        samples = measure(args.runs, before_tree)
    load_after = os.getloadavg()
    payload = {
        "runs": args.runs,
        "before": args.before,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "median_s": {label: statistics.median(values) for label, values in samples.items()},
        "samples_s": samples,
    }
    base = payload["median_s"]["python -c pass"]
    payload["ratio_to_python"] = {label: value / base for label, value in payload["median_s"].items()}
    torch_s = payload["median_s"]['python -c "import torch"']
    payload["ratio_to_import_torch"] = {label: value / torch_s for label, value in payload["median_s"].items()}
    path = write_results("cli_startup", payload, _table(payload))
    for label, seconds in payload["median_s"].items():
        print(f"{label:32s} {seconds:.3f} s  {seconds / base:5.2f}x python  {seconds / torch_s:5.2f}x torch")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
