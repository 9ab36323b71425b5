"""A sweep's on-disk record: what was planned, what was submitted (job ids), and what each run reached.

<sweep_dir>/plan.json                  fingerprint of the resolved runs (refuse a different spec unless --force)
<sweep_dir>/jobs.json                  run -> list of submissions {job_id, executor, submitted, config_hash}
<sweep_dir>/configs/<run>.yaml         the full trainer config each job trains from
<sweep_dir>/state/<run>.attempts.jsonl start / preempted / finished / failed events written by the job
<sweep_dir>/state/<run>.result.json    final metrics, written atomically by rank 0 when the trainer finished
<sweep_dir>/submitit/                  submitit pickles and job logs

Every JSON file is replaced atomically; submissions hold an exclusive lock on the sweep dir.
A Slurm job's state comes from launch/slurm_jobs.py, which the run lock asks too.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from fsutil import atomic_write_json, exclusive_lock, read_jsonl
from launch.slurm_jobs import slurm_states


def _atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=1, sort_keys=True, default=str)


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt sweep record ({error})") from None


class SweepState:
    def __init__(self, sweep_dir: Path) -> None:
        self.dir = Path(sweep_dir)

    # ------------------------------------------------------------------------------------------ paths
    @property
    def plan_path(self) -> Path:
        return self.dir / "plan.json"

    @property
    def jobs_path(self) -> Path:
        return self.dir / "jobs.json"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def submitit_dir(self) -> Path:
        return self.dir / "submitit"

    def config_path(self, run: str) -> Path:
        return self.dir / "configs" / f"{run}.yaml"

    def result_path(self, run: str) -> Path:
        return self.state_dir / f"{run}.result.json"

    def events_path(self, run: str) -> Path:
        return self.state_dir / f"{run}.attempts.jsonl"

    # ------------------------------------------------------------------------------------------ records
    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive, blocking: one submission at a time per sweep dir (its `.lock` file stays)."""
        return exclusive_lock(self.dir / ".lock")

    def read_plan(self) -> dict[str, Any] | None:
        return _read_json(self.plan_path, None)

    def write_plan(self, fingerprint: dict[str, Any]) -> None:
        _atomic_write_json(self.plan_path, fingerprint)

    def read_jobs(self) -> dict[str, list[dict[str, Any]]]:
        return _read_json(self.jobs_path, {})

    def record_submissions(self, entries: dict[str, dict[str, Any]]) -> None:
        jobs = self.read_jobs()
        for run, entry in entries.items():
            jobs.setdefault(run, []).append(entry)
        _atomic_write_json(self.jobs_path, jobs)

    def result(self, run: str) -> dict[str, Any] | None:
        return _read_json(self.result_path(run), None)

    def events(self, run: str) -> list[dict[str, Any]]:
        return read_jsonl(self.events_path(run))


# ---------------------------------------------------------------------------------------------- job states
def local_state(entry: dict[str, Any]) -> str:
    """A local-executor job: its controller pid on this host, and submitit's result pickle."""
    folder = Path(entry.get("folder", ""))
    job_id = str(entry.get("job_id"))
    result = folder / f"{job_id}_0_result.pkl"
    if result.is_file():
        import pickle

        try:
            with open(result, "rb") as handle:
                outcome = pickle.load(handle)[0]
        except Exception:  # noqa: BLE001 - an unreadable pickle is a failed job
            outcome = "error"
        return "COMPLETED" if outcome == "success" else "FAILED"
    try:
        os.kill(int(job_id), 0)
        return "RUNNING"
    except (ProcessLookupError, ValueError):
        return "LOST"
    except PermissionError:
        return "RUNNING"


def run_states(state: SweepState, plans: list[Any]) -> dict[str, str]:
    """DONE (result matches the planned config), NEW (never submitted), or the latest job's scheduler state."""
    jobs = state.read_jobs()
    latest = {p.name: jobs[p.name][-1] for p in plans if jobs.get(p.name)}
    slurm_ids = [str(e["job_id"]) for e in latest.values() if e.get("executor") == "slurm" and e.get("job_id")]
    sl = slurm_states(slurm_ids)
    out: dict[str, str] = {}
    for plan in plans:
        result = state.result(plan.name)
        if result is not None and result.get("config_hash") == plan.config_hash:
            out[plan.name] = "DONE"
            continue
        entry = latest.get(plan.name)
        if entry is None:
            out[plan.name] = "NEW"
        elif entry.get("error"):
            out[plan.name] = "SUBMIT_FAILED"
        elif entry.get("executor") == "local":
            out[plan.name] = local_state(entry)
        else:
            out[plan.name] = sl.get(str(entry["job_id"]), "UNKNOWN")
    return out

