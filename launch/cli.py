"""The `ebt` command line: one entry point whose subcommands live next to the code they drive.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on them. Keeping registration in the owning package means the CLI never grows a
second copy of any option logic.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: list[str] = [
    "data_pipeline.cli",
    "launch.train",
    "launch.generate",
    "slurm.cli",
    "eval.cli",
]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformer pretraining")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    from launch.distributed import RankLostError

    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RankLostError as error:  # not the user's input: another process of the run went away
        print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
