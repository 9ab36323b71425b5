"""`ebt sweep status` (one table for the whole sweep) and `ebt sweep collect` (final metrics per run to CSV/parquet).

Progress comes from each run's metrics.jsonl (written by the trainer), requeues from the attempt log the job
writes, and the scheduler state from squeue/sacct via the recorded job ids.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsutil import atomic_write_bytes, atomic_write_text, read_metrics_rows
from slurm.spec import RunPlan, SweepSpec
from slurm.state import SweepState, run_states


def _eta_seconds(train_rows: list[dict[str, Any]], since: float | None, max_steps: int) -> float | None:
    """Remaining steps over the step rate of the current attempt (rows logged after its start)."""
    rows = [r for r in train_rows if isinstance(r.get("time"), (int, float)) and (since is None or r["time"] >= since)]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    dt = last["time"] - first["time"]
    ds = last["step"] - first["step"]
    if dt <= 0 or ds <= 0:
        return None
    return max(0.0, (max_steps - last["step"]) * dt / ds)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def count_requeues(events: list[dict[str, Any]], sched_state: str) -> int:
    """Preemptions that were requeued: each "preempted" followed by a later "start". A trailing one counts only
    while the job is still queued or running again (its restart has not logged yet); a final preemption that
    was never requeued (requeue limit reached, cancelled, job ended) does not, matching sacct's REQUEUED."""
    kinds = [e.get("event") for e in events]
    count = 0
    for i, kind in enumerate(kinds):
        if kind != "preempted":
            continue
        if "start" in kinds[i + 1:]:
            count += 1
        elif i == len(kinds) - 1 and sched_state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                                                     "CONFIGURING", "RUNNING"):
            count += 1
    return count


def run_status(state: SweepState, plan: RunPlan, sched_state: str) -> dict[str, Any]:
    rows = read_metrics_rows(plan.run_dir)
    train_rows = [r for r in rows if not r.get("final") and "loss" in r]
    last = train_rows[-1] if train_rows else {}
    events = state.events(plan.name)
    starts = [e for e in events if e.get("event") == "start"]
    requeues = count_requeues(events, sched_state)
    final = next((r for r in reversed(rows) if r.get("final")), None)
    step = (final or last).get("step", 0)
    tokens = (final or last).get("tokens", 0)
    eta = None
    if sched_state != "DONE" and sched_state in ("RUNNING",):
        eta = _eta_seconds(train_rows, starts[-1]["time"] if starts else None, plan.max_steps)
    return {"run": plan.name, "state": sched_state, "step": step, "max_steps": plan.max_steps, "tokens": tokens,
            "loss": last.get("loss"), "val_loss": (final or {}).get("val_loss"), "requeues": requeues,
            "attempts": len(starts), "eta_s": eta}


def status(spec: SweepSpec, out: Callable[[str], None] = print, as_json: bool = False) -> list[dict[str, Any]]:
    from slurm.submit import print_table

    plans = spec.plan()
    state = SweepState(spec.sweep_dir)
    if state.read_plan() is None:
        raise ValueError(f"sweep '{spec.name}' has not been submitted yet (no record in {state.dir}); "
                         f"run: ebt sweep submit {spec.path}")
    states = run_states(state, plans)
    table = [run_status(state, p, states[p.name]) for p in plans]
    if as_json:
        out(json.dumps(table, indent=1))
        return table
    rows = [[r["run"], r["state"], f"{r['step']}/{r['max_steps']}", f"{r['tokens']:,}",
             "-" if r["loss"] is None else f"{r['loss']:.4f}", str(r["requeues"]), _fmt_duration(r["eta_s"])]
            for r in table]
    done = sum(1 for r in table if r["state"] == "DONE")
    print_table(["run", "state", "step", "tokens", "last loss", "requeues", "ETA"], rows, out,
                title=f"sweep {spec.name}: {done}/{len(table)} done")
    return table


COLLECT_COLUMNS = ["run", "sweep", "size", "kind", "lr", "seed", "context_length", "params", "flops_per_token",
                   "max_steps", "tokens_per_step", "budget_tokens", "budget_flops", "state", "finished", "step",
                   "tokens", "train_flops", "train_loss", "val_loss", "val_ppl", "requeues", "job_id", "run_dir"]


def collect_rows(spec: SweepSpec) -> list[dict[str, Any]]:
    from ebt.flops import parameter_count, train_flops_per_token

    plans = spec.plan()
    state = SweepState(spec.sweep_dir)
    states = run_states(state, plans)
    rows = []
    for plan in plans:
        m = plan.config.model
        fpt = float(train_flops_per_token(m))
        result = state.result(plan.name) if states[plan.name] == "DONE" else None
        events = state.events(plan.name)
        row: dict[str, Any] = {
            "run": plan.name, "sweep": spec.name, "size": m.size, "kind": m.kind, "lr": plan.config.peak_lr,
            "seed": plan.config.trainer.seed, "context_length": m.architecture.context_length,
            "params": parameter_count(m),
            "flops_per_token": fpt, "max_steps": plan.max_steps, "tokens_per_step": plan.tokens_per_step,
            "budget_tokens": plan.point.get("tokens"), "budget_flops": plan.point.get("flops"),
            "state": states[plan.name], "finished": result is not None,
            "requeues": count_requeues(events, states[plan.name]), "run_dir": str(plan.run_dir),
        }
        if result is not None:
            tokens = result.get("tokens")
            row.update(step=result.get("step"), tokens=tokens, train_flops=None if tokens is None else tokens * fpt,
                       train_loss=result.get("train_loss"), val_loss=result.get("val_loss"),
                       val_ppl=result.get("val_ppl"), job_id=result.get("job_id"))
        rows.append({c: row.get(c) for c in COLLECT_COLUMNS})
    return rows


def collect(spec: SweepSpec, out_path: str | Path | None = None, out: Callable[[str], None] = print,
            parquet: bool = True) -> list[Path]:
    """Write <out>.csv (and <out>.parquet) atomically; default <sweep_dir>/results."""
    rows = collect_rows(spec)
    stem = Path(out_path) if out_path else spec.sweep_dir / "results"
    if stem.suffix in (".csv", ".parquet"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    # Both tables are small: render each in memory, then write it with fsutil's durable atomic write.
    csv_path = stem.with_suffix(".csv")
    text = io.StringIO(newline="")  # csv writes its own \r\n line ends, untranslated
    writer = csv.DictWriter(text, fieldnames=COLLECT_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(csv_path, text.getvalue())
    written.append(csv_path)
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq_path = stem.with_suffix(".parquet")
        table = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), table)
        atomic_write_bytes(pq_path, table.getvalue())
        written.append(pq_path)
    done = sum(1 for r in rows if r["finished"])
    out(f"{done}/{len(rows)} runs finished; wrote {', '.join(str(p) for p in written)}")
    return written
