"""fsutil, the file helpers every layer shares: crash-safe writes (files, directories), the JSON-lines readers,
sha256 of files and the inter-process lock."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fsutil
from fsutil import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_json,
    exclusive_lock,
    iter_jsonl_lines,
    read_jsonl,
    read_metrics_rows,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[2]


def visible(directory: Path, suffix: str = "") -> list[str]:
    """What readers' globs see: the shell's `*` (glob.glob skips hidden names) and pathlib's `*<suffix>` (which
    does not skip them, so the temp name must not end like the target)."""
    shell = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*")))
    assert shell == sorted(p.name for p in directory.glob(f"*{suffix}"))
    return shell


def everything(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_package_needs_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, fsutil; print('torch' in sys.modules)"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- atomic files


def test_an_exception_mid_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def fail(fd: int) -> None:  # the data is written, the fsync (and so the rename) never happens
        raise OSError("disk gone")

    monkeypatch.setattr(fsutil.durable.os, "fsync", fail)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert everything(tmp_path) == ["state.json"]


def test_a_writer_killed_mid_loop_leaves_a_whole_file_and_readers_never_see_a_torn_one(tmp_path):
    target = tmp_path / "data.bin"
    size = 1 << 20
    writer = python("""
        import sys
        from fsutil import atomic_write_bytes
        i = 0
        while True:
            atomic_write_bytes(sys.argv[1], bytes([65 + i % 2]) * int(sys.argv[2]))
            i += 1
        """, str(target), str(size))
    try:
        wait_for(target.exists)
        reads = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            data = target.read_bytes()  # every read sees one complete version
            assert len(data) == size and data in (b"A" * size, b"B" * size)
            assert visible(tmp_path, ".bin") == ["data.bin"]
            reads += 1
        assert reads > 5 and writer.poll() is None, writer.communicate()[1][-2000:]
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    data = target.read_bytes()
    assert data in (b"A" * size, b"B" * size)
    assert visible(tmp_path, ".bin") == ["data.bin"]  # a temp file the kill left behind is hidden from globs


def test_atomic_writes_follow_the_umask_like_open(tmp_path):
    atomic_write_bytes(tmp_path / "a", b"x")
    (tmp_path / "b").write_bytes(b"x")
    assert (tmp_path / "a").stat().st_mode & 0o777 == (tmp_path / "b").stat().st_mode & 0o777


def test_sha256_file_matches_hashlib(tmp_path):
    blob = os.urandom(3 << 20 | 17)  # several chunks and a partial one
    (tmp_path / "f").write_bytes(blob)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(blob).hexdigest()
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------- directories


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_error(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as staged:
        (staged / "model.bin").write_bytes(b"one")
    assert everything(tmp_path) == ["export"] and (final / "model.bin").read_bytes() == b"one"
    with pytest.raises(RuntimeError), atomic_dir(final) as staged:
        (staged / "model.bin").write_bytes(b"torn")
        raise RuntimeError("interrupted")
    assert everything(tmp_path) == ["export"] and (final / "model.bin").read_bytes() == b"one"
    with atomic_dir(final) as staged:
        (staged / "other.bin").write_bytes(b"two")
    assert everything(final) == ["other.bin"] and everything(tmp_path) == ["export"]


def test_atomic_dir_with_a_fixed_staging_name_clears_a_killed_run_s_leftover(tmp_path):
    leftover = tmp_path / ".out.partial"
    leftover.mkdir()
    (leftover / "half.npy").write_bytes(b"x")
    with atomic_dir(tmp_path / "out", staging=".out.partial") as staged:
        assert everything(staged) == []
        (staged / "manifest.json").write_text("{}")
    assert everything(tmp_path) == ["out"] and everything(tmp_path / "out") == ["manifest.json"]


def test_atomic_write_files_keeps_other_files_and_leaves_no_staging_dir(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "report.md").write_text("old")
    paths = atomic_write_files(out, {"report.md": b"new", "fits.json": b"{}"})
    assert paths == [out / "report.md", out / "fits.json"]
    assert everything(out) == ["fits.json", "notes.txt", "report.md"] and (out / "report.md").read_text() == "new"
    assert everything(tmp_path) == ["report"]


# ---------------------------------------------------------------------------------------------- json lines


def test_the_jsonl_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')  # killed mid-write
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_metrics_rows(tmp_path) == [{"step": 1}, {"step": 2}]
    lines = list(iter_jsonl_lines(path))
    assert [(line.number, line.error is None) for line in lines] == [(1, True), (3, True), (4, False)]
    assert lines[2].offset == len('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(tmp_path / "missing.jsonl") == [] and read_metrics_rows(tmp_path / "nope") == []


def test_a_bad_utf8_line_spoils_only_itself(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\xfe\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    bad = [line for line in iter_jsonl_lines(path) if line.error is not None]
    assert len(bad) == 1 and bad[0].number == 2 and isinstance(bad[0].error, UnicodeDecodeError)


# ---------------------------------------------------------------------------------------------- lock

TRY_LOCK = """
    import sys
    from fsutil import exclusive_lock
    try:
        with exclusive_lock(sys.argv[1], timeout=float(sys.argv[2])):
            print("acquired", flush=True)
    except TimeoutError:
        print("timed out", flush=True)
    """

HOLD_LOCK = """
    import sys, time
    from fsutil import exclusive_lock
    with exclusive_lock(sys.argv[1], leave_nothing=sys.argv[2] == "1"):
        print("holding", flush=True)
        time.sleep(600)
    """


def test_the_lock_excludes_another_process_until_released(tmp_path):
    path = tmp_path / ".lock"
    with exclusive_lock(path):
        out, _ = python(TRY_LOCK, str(path), "0.5").communicate(timeout=120)
        assert out.strip() == "timed out"
    out, _ = python(TRY_LOCK, str(path), "30").communicate(timeout=120)
    assert out.strip() == "acquired"
    assert path.exists()  # a plain lock file stays (the sweep dir's .lock)


@pytest.mark.parametrize("leave_nothing", [False, True])
def test_a_killed_holder_releases_the_lock(tmp_path, leave_nothing):
    path = tmp_path / "sub" / "out.lock"
    holder = python(HOLD_LOCK, str(path), "1" if leave_nothing else "0")
    try:
        assert holder.stdout.readline().strip() == "holding", holder.communicate()[1][-2000:]
        out, _ = python(TRY_LOCK, str(path), "0.3").communicate(timeout=120)
        assert out.strip() == "timed out"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with exclusive_lock(path, timeout=30):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_leave_nothing_removes_the_lock_file_and_the_dirs_it_made(tmp_path):
    path = tmp_path / "a" / "b" / "out.lock"
    with exclusive_lock(path, leave_nothing=True):
        assert path.exists()
    assert everything(tmp_path) == []
    (tmp_path / "a").mkdir()
    with exclusive_lock(path, leave_nothing=True):
        (tmp_path / "a" / "b" / "out").mkdir()  # the output it guards: the directory stays
    assert everything(tmp_path / "a" / "b") == ["out"]


def test_a_forked_child_exiting_does_not_release_the_parent_s_lock(tmp_path):
    """Data preparation forks its tokenizer pool while it holds the lock."""
    import multiprocessing as mp

    path = tmp_path / "out.lock"
    with exclusive_lock(path, leave_nothing=True):
        child = mp.get_context("fork").Process(target=time.sleep, args=(0.01,))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0
        out, _ = python(TRY_LOCK, str(path), "0.3").communicate(timeout=120)
        assert out.strip() == "timed out"
