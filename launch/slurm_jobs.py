"""Slurm jobs as the scheduler names and reports them: this job's id, any job's state, and which states still own a run.

Below slurm/ on purpose: the run lock (launch/run_lock.py) asks Slurm whether a holder on another host has ended,
and the sweeps (slurm/state.py, slurm/submit.py) ask the same questions of their submissions. submitit, which
parses squeue's and sacct's output, is imported only when a state is actually asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# Slurm states in which a job still owns the run: do not submit it again, do not take its lock over.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT"}


def slurm_job_id() -> str | None:
    """This job's id as squeue and sacct name it: `<array job>_<task>` for an array task (its SLURM_JOB_ID is
    another number, unknown to the sweep's records), else SLURM_JOB_ID. A requeued job keeps it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job id ("123" or "123_4"): the controller's view (squeue, which keeps ended jobs for
    MinJobAge) wins over accounting (sacct). A job neither knows is LOST: an array task cancelled while pending
    leaves no record at all. When the controller cannot be asked, the state is UNKNOWN (never resubmitted)."""
    if not job_ids:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher  # Slurm only: parses squeue's and sacct's tables

    base_ids = sorted({j.split("_")[0] for j in job_ids})
    watcher = SlurmInfoWatcher()
    states: dict[str, str] = {}
    controller_ok = False
    if shutil.which("sacct") is not None:
        try:
            out = subprocess.run(["sacct", "-X", "--parsable2", "-o", "JobID,State", *[f"-j{b}" for b in base_ids]],
                                 capture_output=True, text=True, timeout=60)
            for jid, info in watcher.read_info(out.stdout).items():
                states[jid] = info.get("State", "UNKNOWN").split()[0]
        except (subprocess.SubprocessError, OSError):
            pass
    if shutil.which("squeue") is not None:
        try:
            out = subprocess.run(["squeue", "-h", "-a", "-r", "-t", "all", "-o", "%i|%T"], capture_output=True,
                                 text=True, timeout=60)
            controller_ok = out.returncode == 0
            for jid, info in watcher.read_info("JobID|State\n" + out.stdout).items():
                if jid.split("_")[0] in base_ids:
                    states[jid] = info["State"]
        except (subprocess.SubprocessError, OSError):
            pass
    return {j: states.get(j, "LOST" if controller_ok else "UNKNOWN") for j in job_ids}


def is_active(state_name: str) -> bool:
    """Whether a job in this state may still be running the run (UNKNOWN counts: never act on a guess)."""
    return state_name in ACTIVE_STATES or state_name in ("UNKNOWN", "RUNNING")
