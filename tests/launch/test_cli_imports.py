"""`ebt --help` and every subcommand's `--help` build the parser from light modules only.

launch/cli.py imports every command module to build its parser, so one module importing torch at module level
makes `ebt --help` take seconds (1.8 s quiet, 42 s under load before issue 15). The probe runs in a fresh
interpreter, because this test process has torch loaded already (conftest.py). Timing is not asserted here: it
lives in benchmarks/cli_startup.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser

REPO = Path(__file__).resolve().parents[2]

# Measured with `python -X importtime -c "import X"` on this machine: each costs 25 ms (yaml) to 3 s (deepspeed).
# The repository's own packages that load torch (ebt, data_pipeline's package, launch.config, launch.distributed)
# are listed too, so a failure names the first culprit rather than only torch.
HEAVY = (
    "torch", "numpy", "omegaconf", "yaml", "sentencepiece", "deepspeed", "accelerate", "datasets", "pyarrow",
    "pandas", "scipy", "matplotlib", "submitit", "transformers", "wandb", "lm_eval", "tqdm", "filelock",
    "safetensors", "huggingface_hub",
    "ebt", "data_pipeline", "launch.config", "launch.distributed", "launch.resume", "launch.checkpoint",
)

# Builds the parser, prints the help of `ebt` and of every (nested) subcommand through main(), then reports each
# help's exit code and every module loaded by then.
_PROBE = r"""
import argparse, contextlib, io, json, sys

from launch.cli import build_parser, main


def command_paths(parser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


helps = {}
for path in command_paths(build_parser()):
    out, err = io.StringIO(), io.StringIO()
    code = "returned"  # --help must exit; returning means the command ran instead
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*path, "--help"])
        except SystemExit as exit:
            code = exit.code or 0
    helps[" ".join(path)] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps({"helps": helps, "modules": sorted(sys.modules)}))
"""


def _subcommands() -> list[str]:
    """The top-level commands, enumerated from the parser so that a newly registered one is covered."""
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


@pytest.fixture(scope="module")
def probe() -> dict:
    completed = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True,
                               timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_help_of_every_command_loads_no_heavy_module(probe):
    loaded = [name for name in HEAVY if name in probe["modules"]]
    assert not loaded, (
        f"building the `ebt` parser and printing every --help imported {', '.join(loaded)}: a command module "
        "imports it at module level (find which with `python -X importtime -c \"from launch.cli import "
        "build_parser; build_parser()\"`) and should import it inside the function that runs the command")


def test_every_command_path_prints_its_help_and_exits_0(probe):
    helps = probe["helps"]
    # The probe found the nested commands too: without them this test would check little.
    assert {"", "train", "data prepare", "tokenizer train", "sweep submit", "eval"} <= set(helps)
    for path, result in helps.items():
        assert result["code"] == 0, (path, result)
        assert result["stdout"].startswith(f"usage: ebt {path}".rstrip()), (path, result["stdout"][:300])
        assert result["stderr"] == "", (path, result["stderr"])


@pytest.mark.parametrize("command", _subcommands())
def test_ebt_subcommand_help_exits_0_in_a_fresh_process(command):
    completed = subprocess.run([sys.executable, "-m", "launch.cli", command, "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.startswith(f"usage: ebt {command}"), completed.stdout[:300]


def test_the_train_flag_spelled_for_registration_is_launch_resumes():
    import launch.resume
    import launch.train

    assert launch.train.ALLOW_FLAG == launch.resume.ALLOW_FLAG
    assert launch.train.RESTART_FLAG == launch.resume.RESTART_FLAG


def test_a_lost_rank_is_one_line_and_exit_1_other_runtime_errors_propagate(monkeypatch, capsys, tmp_path):
    import launch.cli
    import launch.train
    from launch.distributed import RankLostError

    def lost(args):
        raise RankLostError("rank 1 of 2 lost")

    monkeypatch.setattr(launch.train, "_export", lost)  # register() reads the global when main builds the parser
    assert launch.cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == "ebt export: error: rank 1 of 2 lost\n"

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(launch.train, "_export", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        launch.cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")])


def test_python_m_launch_cli_catches_the_user_error_that_commands_raise():
    # `python -m launch.cli` (how `ebt train --nproc` starts its ranks) runs the file as __main__, a second copy
    # of the module; a command's launch.cli.UserError must still be one line and exit 2, not a traceback.
    script = (
        "import runpy, sys\n"
        "import launch.cli, launch.train\n"
        "def refuse(args):\n"
        "    raise launch.cli.UserError('refused')\n"
        "launch.train._export = refuse\n"
        "sys.argv = ['ebt', 'export', 'ckpt', 'out']\n"
        "runpy.run_module('launch.cli', run_name='__main__', alter_sys=True)\n"
    )
    # -W: runpy warns that launch.cli was imported before it runs as __main__, which is the case tested here.
    completed = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", script], cwd=REPO,
                               capture_output=True, text=True, timeout=300, check=False)
    assert (completed.returncode, completed.stderr) == (2, "ebt export: error: refused\n"), completed.stderr[-3000:]
