"""`ebt sweep submit|status|collect SPEC`: scaling sweeps as Slurm job arrays (or local processes)."""

from __future__ import annotations

import argparse

# Registration is argparse only (`ebt --help` imports this module): slurm.spec, submit and report, and through
# them launch.config and submitit, are imported by the command that runs.


def _submit(args: argparse.Namespace) -> int:
    from launch.cli import UserError
    from slurm.spec import load_spec
    from slurm.submit import submit

    spec = load_spec(args.spec, sweep_dir=args.sweep_dir)
    report = submit(spec, dry_run=args.dry_run, local=args.local, force=args.force)
    if report.run_failures:
        first = next(iter(report.run_failures.items()))
        raise UserError(f"{len(report.run_failures)} local run(s) failed; first: run '{first[0]}', log {first[1]}")
    if report.failed:
        first = next(iter(report.failed.items()))
        raise UserError(f"{len(report.failed)} run(s) not submitted (recorded in {spec.sweep_dir}/jobs.json); "
                        f"first: run '{first[0]}': {first[1]}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from slurm.report import status
    from slurm.spec import load_spec

    status(load_spec(args.spec, sweep_dir=args.sweep_dir), as_json=args.json)
    return 0


def _collect(args: argparse.Namespace) -> int:
    from slurm.report import collect
    from slurm.spec import load_spec

    collect(load_spec(args.spec, sweep_dir=args.sweep_dir), out_path=args.out, parquet=not args.no_parquet)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="scaling sweeps on Slurm (submitit): submit, status, collect",
                              description="Sweeps over sizes, kinds, LRs and budgets from one YAML spec "
                              "(see configs/sweeps/).")
    sub = p.add_subparsers(dest="sweep_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("spec", help="sweep spec YAML")
        q.add_argument("--sweep-dir", default=None, help="sweep record dir (default: spec's sweep_dir, "
                       "else sweeps/<name>)")

    s = sub.add_parser("submit", help="submit unfinished runs (finished and queued ones are skipped)")
    common(s)
    s.add_argument("--dry-run", action="store_true", help="print the grid and the sbatch scripts; submit nothing")
    s.add_argument("--local", action="store_true", help="run with submitit's local executor (no Slurm); waits")
    s.add_argument("--force", action="store_true", help="accept a spec that differs from the recorded one")
    s.set_defaults(func=_submit)

    st = sub.add_parser("status", help="one table: run, state, step, tokens, last loss, requeues, ETA")
    common(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    st.set_defaults(func=_status)

    c = sub.add_parser("collect", help="final metrics per run to CSV and parquet")
    common(c)
    c.add_argument("--out", default=None, help="output path stem (default: <sweep_dir>/results)")
    c.add_argument("--no-parquet", action="store_true", help="write only the CSV")
    c.set_defaults(func=_collect)
