"""The `ebt` command line: one entry point whose subcommands live next to the code they drive.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on them. Keeping registration in the owning package means the CLI never grows a
second copy of any option logic.

Every command module is imported to build the parser, even for `ebt --help`, so those modules import only the
standard library at module level: torch, the data pipeline and the config schemas are imported inside the
`func` that needs them (`ebt --help` took 1.8 s, nearly all of it importing torch; tests/launch/test_cli_imports.py
keeps the heavy packages out, benchmarks/cli_startup.py measures the time).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from launch.signals import INTERRUPTED_EXIT_CODE, TrainingInterrupted

COMMAND_MODULES: list[str] = [
    "launch.data_cli",
    "launch.train",
    "launch.generate",
    "launch.checkpoint_cli",
    "slurm.cli",
    "eval.cli",
]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class RunError(Exception):
    """The run cannot go on for a reason outside the code and the input (a full disk): printed as one line, exit
    code 1, no traceback. `quiet`: print nothing (ranks other than 0 of a job, whose rank 0 says it)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformer pretraining")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`ebt ARGV` (sys.argv when None, a real command line); the exit code."""
    try:
        if os.environ.get("EBT_ALLOCATOR_REEXEC"):  # launch.allocator.ENV_REEXEC (not imported: stdlib only here)
            # launch/allocator.py blocks SIGINT across its re-exec: a Ctrl-C pressed meanwhile is delivered now,
            # inside this try, as one line instead of a silent death of the new interpreter.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        code = _run(argv)
    except KeyboardInterrupt as error:  # anywhere, building the parser included: one line, never a traceback
        code = INTERRUPTED_EXIT_CODE
        _say_interrupted(error, argv)
    if code == INTERRUPTED_EXIT_CODE and argv is None:
        # At a terminal, a Ctrl-C also reaches every rank of `--nproc` and its launcher forwards the same one: a
        # copy (or a second press) must not turn this exit, a line or two away, into a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _say_interrupted(error: KeyboardInterrupt, argv: list[str] | None) -> None:
    """`ebt train` stopped by a Ctrl-C after checkpointing says where (launch.signals.TrainingInterrupted, whose
    message is empty on ranks other than 0); any other Ctrl-C says only that, on rank 0."""
    if argv is None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in main: the launcher's copy must not cut this line
    command = next((arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")), "")
    message = str(error) if isinstance(error, TrainingInterrupted) else (
        "interrupted (Ctrl-C)" if os.environ.get("RANK", "0") == "0" else "")
    if message:
        print(f"ebt {command}: {message}" if command else f"ebt: {message}", file=sys.stderr)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `ebt train cfg.yaml --nproc 2 key=value`: argparse stops a positional list at the first option, so
    # positionals after it arrive here; they belong to the command's positional list (configs/overrides).
    if extra and hasattr(args, "configs") and not any(arg.startswith("-") for arg in extra):
        args.configs = [*args.configs, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # A real command line (not a call from Python) may replace its own process, e.g. `ebt train` re-executing
    # itself with the configured CPU allocator preloaded (launch/allocator.py).
    args.from_command_line = argv is None
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        if not error.quiet:
            print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if _is_rank_lost(error):  # not the user's input: another process of the run went away
            print(f"ebt {args.command}: error: {error}", file=sys.stderr)
            return 1
        raise


def _is_rank_lost(error: BaseException) -> bool:
    """Whether `error` is launch.distributed.RankLostError, without importing that module (it imports torch).
    Only code that imported launch.distributed can raise one, so a module not loaded means it is not one."""
    distributed = sys.modules.get("launch.distributed")
    return distributed is not None and isinstance(error, distributed.RankLostError)


if __name__ == "__main__":
    # `python -m launch.cli` runs this file as __main__, a second copy of the module: commands raise
    # launch.cli.UserError (slurm/cli.py), which __main__'s own UserError would not catch. Run the imported copy.
    from launch.cli import main as imported_main

    sys.exit(imported_main())
