"""`slurm/dev-cluster.sh install` waits for another apt/dpkg's lock instead of failing at once (issue 14). The
packages are made to look missing (a PATH without Slurm) and apt-get is a stub that fails, as apt does, when a
lock is held at its start; the locks are private files held with fcntl, as apt holds its own."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "dev-cluster.sh"

STUB = """#!/bin/bash
# apt-get stand-in: fail like apt when a lock is held, else record the call
for f in $EBT_DEV_CLUSTER_APT_LOCKS; do
    python3 -c 'import fcntl,sys; fcntl.lockf(open(sys.argv[1], "a"), fcntl.LOCK_EX | fcntl.LOCK_NB)' "$f" \\
        2>/dev/null || { echo "E: Could not get lock $f" >&2; exit 100; }
done
echo "$*" >>"$STUB_LOG"
"""


def test_install_waits_for_a_held_apt_lock(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python3", "mkdir", "rm", "chmod", "sleep", "cat", "tr", "seq"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "apt-get").write_text(STUB)
    (bin_dir / "apt-get").chmod(0o755)
    locks = [tmp_path / "lock-frontend", tmp_path / "lists-lock"]
    for lock in locks:
        lock.touch()
    holder = open(locks[0], "a")  # noqa: SIM115 - held across the thread below
    fcntl.lockf(holder, fcntl.LOCK_EX)
    released = []

    def release() -> None:
        time.sleep(4)
        released.append(time.time())
        fcntl.lockf(holder, fcntl.LOCK_UN)
        holder.close()

    env = {"PATH": str(bin_dir), "EBT_DEV_CLUSTER_DIR": str(tmp_path / "c"), "EBT_DEV_CLUSTER_APT_WAIT_S": "60",
           "EBT_DEV_CLUSTER_APT_LOCKS": " ".join(map(str, locks)), "STUB_LOG": str(tmp_path / "apt-calls"),
           "EBT_DEV_CLUSTER_POLICY_RC": str(tmp_path / "policy-rc.d"), "HOME": str(tmp_path)}
    thread = threading.Thread(target=release)
    thread.start()
    if os.geteuid() != 0:
        thread.join()
        raise AssertionError("needs root: the script installs packages only as root")
    done = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "install"], env=env, capture_output=True, text=True,
                          timeout=120)
    end = time.time()
    thread.join()
    assert done.returncode == 0, done.stderr
    assert "another apt/dpkg holds its lock; waiting" in done.stderr
    assert released and end >= released[0]
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert len(calls) == 2 and "update" in calls[0] and "install" in calls[1] and "slurmctld" in calls[1]
    assert all("DPkg::Lock::Timeout=60" in c for c in calls)
    assert not (tmp_path / "policy-rc.d").exists()  # the temporary policy is removed again
