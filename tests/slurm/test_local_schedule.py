"""`ebt sweep submit --local` keeps every slot busy (issue 24): the next run starts as soon as one ends, longest
first, never more than `slurm.array_parallelism` at once. Fake runs (threads that sleep) replace the trainer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from config_copies import frozen_quickstart

import slurm.submit as submit_module
from slurm.spec import load_spec
from slurm.submit import estimated_cost, longest_first, schedule_local, submit


@dataclass
class Timeline:
    """Start and end times of every fake run, in the order they started."""

    starts: dict[str, float] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def running_at(self, t: float) -> int:
        return sum(1 for n, s in self.starts.items() if s <= t < self.ends.get(n, float("inf")))


class FakeJob:
    """A run that takes `seconds`; done() like a submitit job."""

    def __init__(self, name: str, seconds: float, timeline: Timeline):
        self.job_id = f"fake-{name}"
        self.paths = SimpleNamespace(stderr=Path(f"/nonexistent/{name}.err"))
        self._name, self._timeline = name, timeline
        with timeline.lock:
            timeline.starts[name] = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        time.sleep(seconds)
        with self._timeline.lock:
            self._timeline.ends[self._name] = time.monotonic()

    def done(self) -> bool:
        return not self._thread.is_alive()


def _poll_wait(jobs, keep: int) -> None:
    while sum(1 for _, j in jobs if not j.done()) > keep:
        time.sleep(0.005)


def test_next_run_starts_when_any_ends_longest_first_within_the_slots():
    # Cost = seconds of run time; "a" is the longest. Waves of two ({a, c}, {d, e}, {b}) would start d only
    # when a ends (1.2 s), although c ends at 0.6 s.
    durations = {"a": 1.2, "b": 0.2, "c": 0.6, "d": 0.4, "e": 0.3}
    plans = [SimpleNamespace(name=n) for n in ("b", "e", "a", "d", "c")]
    timeline = Timeline()
    started = schedule_local(plans, 2, start=lambda p: [(p, FakeJob(p.name, durations[p.name], timeline))],
                             wait=_poll_wait, cost=lambda p: durations[p.name])
    _poll_wait(started, 0)
    order = sorted(timeline.starts, key=timeline.starts.get)
    assert order == ["a", "c", "d", "e", "b"]  # longest first
    slack = 0.15  # thread start-up and polling on a busy machine
    for name in order:
        # At most 2 at once, checked just after every start.
        assert timeline.running_at(timeline.starts[name] + 1e-4) <= 2
    ends = sorted(timeline.ends.values())
    for j, name in enumerate(order[2:]):
        # The (j+3)th run takes the slot the (j+1)th run to end frees, as soon as it is freed.
        assert 0 <= timeline.starts[name] - ends[j] < slack, (name, timeline.starts, timeline.ends)
    # "a" (1.2 s) runs beside c, d, e, b in turn: 1.4 s in all, against 1.8 s in waves.
    total = max(timeline.ends.values()) - min(timeline.starts.values())
    assert total < 1.65


def test_a_slot_never_idles_while_runs_wait():
    durations = {f"r{i}": d for i, d in enumerate((0.25, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05))}
    plans = [SimpleNamespace(name=n) for n in durations]
    timeline = Timeline()
    started = schedule_local(plans, 2, start=lambda p: [(p, FakeJob(p.name, durations[p.name], timeline))],
                             wait=_poll_wait, cost=lambda p: durations[p.name])
    _poll_wait(started, 0)
    last_start = max(timeline.starts.values())
    # Sample the busy period before the last start: both slots are taken nearly all the time.
    samples = [min(timeline.starts.values()) + k * 0.005 for k in range(1, int((last_start - 0.01) / 0.005))]
    samples = [t for t in samples if t < last_start]
    idle = sum(1 for t in samples if timeline.running_at(t) < 2)
    assert idle <= max(2, 0.25 * len(samples)), (idle, len(samples))


def test_failed_submission_does_not_hold_a_slot():
    durations = {"a": 0.1, "b": 0.05, "c": 0.05}
    timeline = Timeline()

    def start(plan):
        return [] if plan.name == "b" else [(plan, FakeJob(plan.name, durations[plan.name], timeline))]

    started = schedule_local([SimpleNamespace(name=n) for n in durations], 1, start=start, wait=_poll_wait,
                             cost=lambda p: durations[p.name])
    assert [p.name for p, _ in started] == ["a", "c"]


@pytest.fixture
def sweep_spec(tmp_path):
    base = frozen_quickstart(tmp_path / "configs")
    spec = {"name": "t", "base": str(base), "runs_dir": str(tmp_path / "runs"), "sweep_dir": str(tmp_path / "sweep"),
            "grid": {"size": ["4xs", "3xs"], "kind": ["ebt", "transformer"], "steps": [3]},
            "slurm": {"array_parallelism": 2}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


def test_estimated_cost_ranks_ebt_above_its_twin_and_bigger_above_smaller(sweep_spec):
    plans = {(p.config.model.size, p.config.model.kind): p for p in sweep_spec.plan()}
    assert estimated_cost(plans["4xs", "ebt"]) > estimated_cost(plans["4xs", "transformer"])
    assert estimated_cost(plans["3xs", "ebt"]) > estimated_cost(plans["4xs", "ebt"])
    assert [(p.config.model.size, p.config.model.kind) for p in longest_first(plans.values())][0] == ("3xs", "ebt")


def test_submit_local_goes_through_the_scheduler(sweep_spec, monkeypatch):
    """`submit(local=True)`: one run per submission, longest first, at most array_parallelism at once."""
    timeline = Timeline()
    seconds = {p.name: 0.02 * estimated_cost(p) / min(estimated_cost(q) for q in sweep_spec.plan())
               for p in sweep_spec.plan()}
    calls = []

    def fake_submit_group(spec, state, group, local):
        assert local and len(group.plans) == 1
        calls.append(group.plans[0].name)
        return [FakeJob(p.name, min(seconds[p.name], 0.3), timeline) for p in group.plans]

    monkeypatch.setattr(submit_module, "_submit_group", fake_submit_group)
    monkeypatch.setattr(submit_module, "LOCAL_POLL_S", 0.005)
    report = submit(sweep_spec, local=True, out=lambda line: None)
    assert sorted(report.submitted) == sorted(seconds)
    assert calls == [p.name for p in longest_first(sweep_spec.plan())]
    assert all(timeline.running_at(s + 1e-4) <= 2 for s in timeline.starts.values())


def test_local_progress_counts_the_whole_sweep(capsys, monkeypatch):
    """The bar between runs says how many of ALL the submit's runs are done ("3/8"), not of those started so far
    ("3/4", which read as a sweep almost finished when half of it had not begun)."""
    class EndsAfterAFewPolls:
        def __init__(self) -> None:
            self.polls = 0

        def done(self) -> bool:
            self.polls += 1
            return self.polls > 3

    jobs = [(SimpleNamespace(name=f"r{i}"), EndsAfterAFewPolls()) for i in range(3)]
    state = SimpleNamespace(result=lambda name: {"val_loss": 1.0})
    monkeypatch.setattr(submit_module, "LOCAL_POLL_S", 0.01)
    submit_module._wait_local(jobs, state, print, keep=0, planned=8)
    err = capsys.readouterr().err
    assert "3/8 runs finished" in err and "3/3" not in err, err
