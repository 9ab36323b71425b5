"""`ebt train` runs CPU training on the configured host allocator: it re-executes itself once with the library
preloaded (same PID, same arguments), falls back to glibc with a note, and names bad choices."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from train_support import env, read_rows, run_train, tiny_raw, write_config

from launch import allocator
from launch.config import build_config

HAVE_TCMALLOC = allocator.find_library("tcmalloc") is not None


def test_choices_resolve_and_bad_ones_name_the_key(monkeypatch):
    monkeypatch.delenv(allocator.ENV_CHOICE, raising=False)
    assert allocator.resolve("system") == ("system", None)
    with pytest.raises(ValueError, match=r"^config key 'trainer.cpu_allocator': must be one of"):
        allocator.resolve("hoard")
    with pytest.raises(ValueError, match=r"^config key 'trainer.cpu_allocator': must be auto, tcmalloc"):
        build_config(tiny_raw(trainer={"cpu_allocator": "hoard"}))
    monkeypatch.setattr(allocator, "find_library", lambda name: None)
    assert allocator.resolve("auto") == ("system", None)  # nothing installed: glibc, not an error
    with pytest.raises(ValueError, match=r"^config key 'trainer.cpu_allocator': jemalloc is not installed"):
        allocator.resolve("jemalloc")
    monkeypatch.setenv(allocator.ENV_CHOICE, "system")
    assert allocator.resolve(allocator.effective_choice("jemalloc")) == ("system", None)  # the environment wins
    monkeypatch.setenv(allocator.ENV_CHOICE, "hoard")
    with pytest.raises(ValueError, match=r"^EBT_CPU_ALLOCATOR: must be one of auto, tcmalloc, jemalloc, system, "
                                         r"got 'hoard'$"):
        allocator.effective_choice("auto")


def test_preload_env_prepends_and_marks_the_reexec():
    out = allocator.preload_env("/lib/x.so", {"LD_PRELOAD": "/lib/y.so", "A": "1"})
    assert out["LD_PRELOAD"] == "/lib/x.so:/lib/y.so" and out[allocator.ENV_REEXEC] == "1" and out["A"] == "1"


@pytest.mark.skipif(not HAVE_TCMALLOC, reason="libtcmalloc-minimal4 is not installed (CI installs it)")
def test_ebt_train_reexecutes_onto_tcmalloc_and_trains_the_same(tmp_path):
    """The re-executed process keeps the arguments (it trains the given config) and trains bit for bit what the
    system allocator trains: the allocator changes memory, never numbers."""
    config = write_config(tmp_path, tiny_raw(trainer={"max_steps": 3}, checkpoint={"every": 0}))
    runs = {}
    for choice in ("auto", "system"):
        done = run_train(tmp_path, config, f"name={choice}", f"trainer.cpu_allocator={choice}")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = "tcmalloc" if choice == "auto" else "system"
        assert f"host allocator: {expected}" in done.stdout
        runs[choice] = [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm")}
                        for r in read_rows(tmp_path / "runs" / choice) if not r.get("final")]
    assert runs["auto"] == runs["system"] and len(runs["auto"]) == 3


def test_missing_allocator_falls_back_with_one_note(tmp_path):
    config = write_config(tmp_path, tiny_raw(trainer={"max_steps": 1}, checkpoint={"every": 0}))
    # The real command line, with the library search emptied: no tcmalloc, no jemalloc.
    code = ("import launch.allocator as a; a.SEARCH_DIRS = (); a.find_library = lambda name: None; "
            "import sys; from launch.cli import main; sys.argv = ['ebt', 'train', *sys.argv[1:]]; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, str(config), "name=fallback"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = [line for line in done.stderr.splitlines() if "neither tcmalloc nor jemalloc is installed" in line]
    assert len(notes) == 1 and "host allocator: system" in done.stdout
    assert os.path.isdir(tmp_path / "runs" / "fallback")
