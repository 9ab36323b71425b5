"""`ebt sweep submit`: plan the runs, skip finished/active ones, and submit the rest with submitit.

Runs that ask for the same resources go out as one Slurm job array (capped by `slurm.array_parallelism`). Every
group is first checked with `sbatch --test-only`, so a bad partition, account or QOS fails the whole submission
with sbatch's own message and the run's name before any job is queued. Job ids are recorded after each group,
and a group that still fails at submission is recorded with its error, so nothing is queued without a record.

With --local there is no scheduler, so `schedule_local` is one: runs start longest first (estimated training
FLOPs, EBT-aware) and the next starts as soon as any running one ends, keeping `slurm.array_parallelism` slots
busy. (It used to start waves of `array_parallelism` runs and wait for each wave's slowest, leaving slots idle.)
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from fsutil.progress import Progress
from launch.run_lock import describe, holder
from launch.slurm_jobs import is_active
from slurm.job import TrainJob
from slurm.spec import RunPlan, SweepSpec, first_difference, plan_fingerprint
from slurm.state import SweepState, run_states


class SubmitError(ValueError):
    """A submission problem the user can fix (bad partition, no Slurm, changed spec): one line."""


@dataclasses.dataclass
class Group:
    """Runs that share one resource request: one sbatch (an array when there are several)."""

    resources: Any
    plans: list[RunPlan]


def task_comments(spec: SweepSpec, state: SweepState, plans: list[RunPlan]) -> list[str]:
    """Shell comments naming, per array task, the exact command its job runs on every rank and its config."""
    python = spec.slurm.python or sys.executable
    lines = ["# Each task runs on every rank (submitit's wrapper, slurm/job.py TrainJob), from "
             f"{shlex.quote(os.getcwd())}:"]
    for index, plan in enumerate(plans):
        task = f"array task {index}" if len(plans) > 1 else "the job"
        config = state.config_path(plan.name)
        lines.append(f"#   {task}: run {plan.name}")
        lines.append(f"#     ebt train {shlex.quote(str(config))}   (= {shlex.quote(python)} -m launch.cli train "
                     f"{shlex.quote(str(config))})")
        if plan.planned_for:
            chosen = plan.gpu_plans[plan.planned_for]
            lines.append(f"#     memory plan ({chosen.describe()})")
    return lines


def sbatch_parameters(spec: SweepSpec, res: Any, comments: list[str] | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names) for one resource request; `comments` go into the script
    (as the first setup lines) so that the submitted script says what each task runs."""
    params: dict[str, Any] = {
        "job_name": f"ebt-{spec.name}",
        "time": int(res.time_min),
        "nodes": int(res.nodes),
        "ntasks_per_node": int(res.tasks_per_node),
        "cpus_per_task": int(res.cpus_per_task),
        "mem": f"{int(res.mem_gb)}GB" if float(res.mem_gb) == int(res.mem_gb) else f"{int(res.mem_gb * 1024)}MB",
        "signal_delay_s": int(spec.slurm.signal_delay_s),
        "array_parallelism": int(spec.slurm.array_parallelism),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = int(res.gpus_per_node)
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(res, key)
        if value:
            params[key] = value
    setup = list(comments or []) + list(spec.slurm.setup)
    if setup:
        params["setup"] = setup
    if spec.slurm.sbatch:
        params["additional_parameters"] = dict(spec.slurm.sbatch)
    return params


def python_command(spec: SweepSpec) -> str:
    return spec.slurm.python or shlex.quote(sys.executable)


def sbatch_script(spec: SweepSpec, state: SweepState, group: Group) -> str:
    """Exactly the script submitit writes for this group (same function, same parameters)."""
    command = " ".join([python_command(spec), "-u -m submitit.core._submit", shlex.quote(str(state.submitit_dir))])
    n = len(group.plans)
    return _make_sbatch_string(command=command, folder=state.submitit_dir, map_count=n if n > 1 else None,
                               **sbatch_parameters(spec, group.resources, task_comments(spec, state, group.plans)))


def group_runs(plans: list[RunPlan]) -> list[Group]:
    groups: dict[Any, Group] = {}
    for plan in plans:
        groups.setdefault(plan.resources, Group(plan.resources, [])).plans.append(plan)
    return list(groups.values())


def _sbatch_error(text: str) -> str:
    """The most specific line of sbatch's stderr (it prints a generic summary line last)."""
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower()]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "sbatch failed without a message"


def preflight(spec: SweepSpec, state: SweepState, groups: list[Group]) -> None:
    """`sbatch --test-only` every group; the first rejection aborts the submission before anything is queued."""
    for group in groups:
        with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as handle:
            handle.write(sbatch_script(spec, state, group))
            path = handle.name
        try:
            proc = subprocess.run(["sbatch", "--test-only", path], capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(path)
        if proc.returncode != 0:
            raise SubmitError(f"run '{group.plans[0].name}': {_sbatch_error(proc.stderr + proc.stdout)}")


def _make_executor(spec: SweepSpec, state: SweepState, res: Any, local: bool,
                   plans: list[RunPlan] | None = None) -> submitit.AutoExecutor:
    if local:
        ex = submitit.AutoExecutor(folder=state.submitit_dir, cluster="local",
                                   local_max_num_timeout=spec.slurm.max_requeues)
        # One node locally: the same world size as tasks on one machine.
        ex.update_parameters(timeout_min=int(res.time_min), tasks_per_node=res.world_size,
                             gpus_per_node=int(res.gpus_per_node) or None, name=f"ebt-{spec.name}")
        return ex
    ex = submitit.AutoExecutor(folder=state.submitit_dir, cluster="slurm",
                               slurm_max_num_timeout=spec.slurm.max_requeues,
                               slurm_python=spec.slurm.python)
    comments = task_comments(spec, state, plans or [])
    ex.update_parameters(**{f"slurm_{k}": v for k, v in sbatch_parameters(spec, res, comments).items()})
    return ex


def _write_configs(state: SweepState, plans: list[RunPlan]) -> None:
    from launch.config import save_config

    for plan in plans:
        save_config(plan.config, state.config_path(plan.name))


def _job_for(state: SweepState, plan: RunPlan, python: str | None) -> TrainJob:
    return TrainJob(run_name=plan.name, config_path=str(state.config_path(plan.name)),
                    state_dir=str(state.state_dir), run_dir=str(plan.run_dir), cwd=os.getcwd(),
                    config_hash=plan.config_hash, python=python)


def _submit_group(spec: SweepSpec, state: SweepState, group: Group, local: bool) -> list[Any]:
    ex = _make_executor(spec, state, group.resources, local, group.plans)
    jobs = []
    with ex.batch():
        for plan in group.plans:
            jobs.append(ex.submit(_job_for(state, plan, None)))
    return jobs


def format_grid(plans: list[RunPlan], states: dict[str, str] | None = None) -> list[list[str]]:
    rows = []
    for p in plans:
        r = p.resources
        row = [p.name, p.config.model.size or "-", p.config.model.kind, f"{p.config.peak_lr:g}",
               str(p.max_steps), f"{p.max_steps * p.tokens_per_step:,}", f"{r.nodes}x{r.tasks_per_node}",
               f"{r.time_min}m", r.partition or "(default)"]
        if states is not None:
            row.append(states.get(p.name, ""))
        rows.append(row)
    return rows


GRID_HEADER = ["run", "size", "kind", "lr", "steps", "tokens", "nodes x tasks", "time", "partition"]


def print_table(header: list[str], rows: list[list[str]], out: Callable[[str], None], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - rendered, not shown
    console.print(table)
    out(console.export_text().rstrip())


MEMORY_HEADER = ["size", "kind", "strategy", "ranks", "per-rank batch", "GPU", "micro-batch", "accum",
                 "checkpointing", "predicted peak / GPU"]


def print_memory_plans(plans: list[RunPlan], out: Callable[[str], None]) -> None:
    """One row per (size, kind, GPU model) of the GPU runs: what planning.plan_cuda chose; `*` marks the GPU
    the runs' configs were planned for (resources.gpu_mem_gb)."""
    rows, seen = [], set()
    for p in plans:
        if not p.gpu_plans:
            continue
        m, t = p.config.model, p.config.trainer
        key = (m.size, m.architecture.dim, m.kind, p.resources)
        if key in seen:
            continue
        seen.add(key)
        for gpu, chosen in p.gpu_plans.items():
            mark = "*" if gpu == p.planned_for else ""
            common = [m.size or f"w{m.architecture.dim}", m.kind, p.config.distributed.strategy,
                      str(p.resources.world_size),
                      str(t.micro_batch_size * t.grad_accum_steps), gpu + mark]
            if isinstance(chosen, str):
                rows.append(common + ["-", "-", "-", "does not fit: " + chosen.split(": ", 1)[-1]])
            else:
                chunk = f" (chunk {chosen.remat_chunk})" if chosen.remat_chunk else ""
                rows.append(common + [str(chosen.micro_batch_size), str(chosen.grad_accum_steps),
                                      chosen.policy + chunk,
                                      f"{chosen.predicted_peak_gb:.1f} GB of {chosen.capacity_gb:.1f} GB"])
    if rows:
        print_table(MEMORY_HEADER, rows, out, title="memory plans per GPU (planning, bf16 autocast, fp32 "
                    "weights + AdamW; * = planned for)")


@dataclasses.dataclass
class SubmitReport:
    submitted: dict[str, str]  # run -> job id
    skipped: dict[str, str]  # run -> why (DONE / RUNNING / ...)
    failed: dict[str, str]  # run -> error (not submitted)
    run_failures: dict[str, str] = dataclasses.field(default_factory=dict)  # --local: run -> log file


def submit(spec: SweepSpec, *, dry_run: bool = False, local: bool = False, force: bool = False,
           wait: bool | None = None, out: Callable[[str], None] = print) -> SubmitReport:
    """Submit every run that is not finished and not already queued/running. See the module docstring."""
    plans = spec.plan()  # validates every point before anything else
    state = SweepState(spec.sweep_dir)
    groups = group_runs(plans)
    if dry_run:
        existing = state.read_plan()
        states = run_states(state, plans) if existing is not None else None
        print_table(GRID_HEADER + (["state"] if states else []), format_grid(plans, states), out,
                    title=f"sweep {spec.name}: {len(plans)} runs in {len(groups)} job group(s)")
        print_memory_plans(plans, out)
        for group in groups:
            out(f"\n# ---- sbatch script for {len(group.plans)} run(s): {', '.join(p.name for p in group.plans)}")
            out(sbatch_script(spec, state, group))
        return SubmitReport({}, {}, {})
    if not local and shutil.which("sbatch") is None:
        raise SubmitError("no Slurm found on PATH (sbatch); run the sweep on this machine with --local")
    if local and any(p.resources.gpus_per_node for p in plans):
        pass  # the local executor sets CUDA_VISIBLE_DEVICES for the requested GPUs
    fingerprint = plan_fingerprint(spec, plans)
    with state.lock():
        existing = state.read_plan()
        if existing is not None and not force:
            diff = first_difference(existing, fingerprint)
            if diff and ".base." in diff and diff.startswith("runs."):
                # Digests mean little to a reader: name the file instead.
                run, rest = diff[len("runs."):].split(".base.", 1)
                diff = f"base config {rest.split(':')[0].removesuffix(' added').removesuffix(' removed')} " \
                       f"changed, run {run}"
            if diff:
                raise SubmitError(f"sweep '{spec.name}' in {state.dir} was submitted with a different spec "
                                  f"({diff}); use a new name, or --force to replace it")
        states = run_states(state, plans)
        # Finished runs and runs a live job still owns are skipped; new, failed and lost ones go out.
        todo = [p for p in plans if not (states[p.name] == "DONE" or is_active(states[p.name]))]
        # So are runs whose run dir a trainer holds now (launch/run_lock.py): started by hand, or by a job this
        # sweep lost track of. A second job would be refused at its start anyway, after waiting in the queue.
        running = {p.name: f"already running: {p.run_dir} is held by {describe(info)}" for p in todo
                   if (info := holder(p.run_dir)) is not None}
        todo = [p for p in todo if p.name not in running]
        skipped = {p.name: "RUNNING" if p.name in running else states[p.name] for p in plans if p not in todo}
        todo_groups = group_runs(todo)
        if not local and todo_groups:
            preflight(spec, state, todo_groups)
        state.write_plan(fingerprint)
        _write_configs(state, todo)
        state.state_dir.mkdir(parents=True, exist_ok=True)
        submitted: dict[str, str] = {}
        failed: dict[str, str] = {}
        local_jobs: list[tuple[RunPlan, Any]] = []
        executor = "local" if local else "slurm"
        for plan in todo:
            if local and plan.resources.nodes > 1:
                out(f"local: {plan.name} runs its {plan.resources.world_size} ranks as processes on this machine")

        def submit_and_record(group: Group) -> list[tuple[RunPlan, Any]]:
            """Submit one group and record it (its job ids, or its error per run)."""
            try:
                jobs = _submit_group(spec, state, group, local)
            except Exception as error:  # noqa: BLE001 - recorded per run, reported below
                msg = _sbatch_error(str(error))
                state.record_submissions({p.name: {"executor": executor, "error": msg, "submitted": time.time(),
                                                   "config_hash": p.config_hash} for p in group.plans})
                failed.update({p.name: msg for p in group.plans})
                return []
            state.record_submissions({p.name: {"executor": executor, "job_id": str(j.job_id),
                                               "submitted": time.time(), "config_hash": p.config_hash,
                                               "folder": str(state.submitit_dir)}
                                      for p, j in zip(group.plans, jobs, strict=True)})
            submitted.update({p.name: str(j.job_id) for p, j in zip(group.plans, jobs, strict=True)})
            return list(zip(group.plans, jobs, strict=True))

        if local:
            local_jobs = schedule_local(
                todo, spec.slurm.array_parallelism,
                start=lambda plan: submit_and_record(Group(plan.resources, [plan])),
                wait=lambda jobs, keep: _wait_local(jobs, state, out, keep=keep, planned=len(todo)))
        else:
            for group in todo_groups:
                submit_and_record(group)
    for name, why in skipped.items():
        out(f"skip {name}: {running.get(name) or ('finished' if why == 'DONE' else why.lower())}")
    for name, job_id in submitted.items():
        out(f"submitted {name}: job {job_id}")
    for name, msg in failed.items():
        out(f"FAILED to submit {name}: {msg}")
    if local and local_jobs and (wait is None or wait):
        _wait_local(local_jobs, state, out, keep=0)
    run_failures = {p.name: str(j.paths.stderr) for p, j in local_jobs if j.done() and state.result(p.name) is None}
    return SubmitReport(submitted, skipped, failed, run_failures)


def estimated_cost(plan: RunPlan) -> float:
    """Training FLOPs of a run (FLOPs per token x tokens per step x steps), EBT-aware through ebt.flops: an EBT
    costs several times its Transformer++ twin. Steps x tokens when the model's FLOPs cannot be counted."""
    from ebt.flops import train_flops_per_token

    try:
        per_token = train_flops_per_token(plan.config.model)
    except (AttributeError, TypeError, ValueError):
        per_token = 1.0
    return float(per_token) * plan.tokens_per_step * plan.max_steps


def longest_first(plans: Iterable[RunPlan], cost: Callable[[RunPlan], float] = estimated_cost) -> list[RunPlan]:
    """Costliest first (stable for ties): the longest run starts early instead of alone at the end."""
    return sorted(plans, key=cost, reverse=True)


def schedule_local(plans: list[RunPlan], slots: int, *, start: Callable[[RunPlan], list[tuple[RunPlan, Any]]],
                   wait: Callable[[list[tuple[RunPlan, Any]], int], None],
                   cost: Callable[[RunPlan], float] = estimated_cost) -> list[tuple[RunPlan, Any]]:
    """Run `plans` on `slots` local slots, longest first; each next run starts as soon as any running one ends.

    `start` submits one run and returns its (plan, job) pairs (none when submission failed); `wait(jobs, keep)`
    blocks until at most `keep` of `jobs` are still running."""
    slots = max(1, int(slots))
    started: list[tuple[RunPlan, Any]] = []
    for plan in longest_first(plans, cost):
        if started:
            wait(started, slots - 1)  # a slot is free once at most slots - 1 runs are still going
        started.extend(start(plan))
    return started


# Seconds between checks of the local runs; a free slot waits at most this long for its next run.
LOCAL_POLL_S = 1.0


def _wait_local(jobs: list[tuple[RunPlan, Any]], state: SweepState, out: Callable[[str], None], keep: int,
                planned: int | None = None) -> None:
    """Block until at most `keep` local jobs are still running, with progress over finished runs (on stderr: a
    bar on a terminal, plain lines in a log; stdout keeps the submit report). `planned`: the runs this submit
    will start in all, so the bar counts the whole sweep rather than the runs started so far."""
    def running() -> list[tuple[RunPlan, Any]]:
        return [(p, j) for p, j in jobs if not j.done()]

    total = max(planned or 0, len(jobs))
    with Progress(prefix="ebt sweep: ", transient=True) as progress:
        task = progress.add("local runs", total, unit="runs finished", completed=len(jobs) - len(running()))
        while len(running()) > keep:
            progress.update(task, len(jobs) - len(running()))
            time.sleep(LOCAL_POLL_S)
        progress.update(task, len(jobs) - len(running()))
    for plan, job in jobs:
        if job.done() and state.result(plan.name) is None and not getattr(job, "_reported", False):
            job._reported = True
            out(f"run {plan.name} failed: see {job.paths.stderr}")
