"""`ebt checkpoint verify RUN_OR_CHECKPOINT`: hash every file of a run's checkpoints (or of one) against its manifest.

Resuming hashes only each rank's own files and `ebt eval` only the model's (launch/checkpoint.py); this is the full
pass, on demand: before copying a run elsewhere, after a filesystem incident, or in a cron job. It reads every byte,
so it prints a line per checkpoint as it goes. Exit 0 when every checkpoint checks out, 1 when any does not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _checkpoints(path: Path) -> list[Path]:
    from launch.checkpoint import MANIFEST, STEP_RE

    if (path / MANIFEST).is_file() or STEP_RE.match(path.name):
        return [path]
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)))
            if steps:
                return [p for _, p in steps]
    raise FileNotFoundError(f"{path}: neither a checkpoint nor a run directory with checkpoints")


def _verify(args: argparse.Namespace) -> int:
    from launch.checkpoint import MANIFEST, verify

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    bad = 0
    for checkpoint in _checkpoints(path):
        start = time.perf_counter()
        problem = verify(checkpoint, hashed=lambda rel: True)
        manifest = checkpoint / MANIFEST
        size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) if manifest.is_file() else 0
        status = "ok" if problem is None else f"BAD: {problem}"
        print(f"{checkpoint}: {status} ({size / 1e6:,.1f} MB hashed in {time.perf_counter() - start:.1f} s)",
              flush=True)
        bad += problem is not None
    return 1 if bad else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect checkpoints")
    commands = parser.add_subparsers(dest="checkpoint_command", required=True)
    verify = commands.add_parser("verify", help="hash every file of a run's checkpoints (or of one checkpoint) "
                                                "against its manifest; exit 1 if any is bad")
    verify.add_argument("path", help="a run dir, its checkpoints/ dir, or one checkpoint (step_N)")
    verify.set_defaults(func=_verify)
