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
import sys

COMMAND_MODULES: list[str] = [
    "launch.data_cli",
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
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 2
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
