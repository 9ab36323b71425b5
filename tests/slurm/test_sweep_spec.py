"""Sweep spec parsing and planning (no cluster): grid expansion, names, budgets, resources, input errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from config_copies import frozen_quickstart

from ebt.flops import train_flops_per_token
from ebt.sizes import SIZES
from launch.cli import main
from slurm.spec import first_difference, load_spec, plan_fingerprint, run_name
from slurm.state import SweepState
from slurm.submit import group_runs, sbatch_script

REPO = Path(__file__).resolve().parents[2]
REPO_BASE = REPO / "configs" / "train" / "quickstart.yaml"
BASE = REPO_BASE  # replaced by a frozen copy for this module (see `frozen_base`)


@pytest.fixture(scope="module", autouse=True)
def frozen_base(tmp_path_factory):
    """Run names and hashes depend on the base config's bytes: plan against a copy nobody edits mid-test."""
    global BASE
    BASE = frozen_quickstart(tmp_path_factory.mktemp("configs"))
    yield BASE
    BASE = REPO_BASE


def write_spec(tmp_path: Path, **fields) -> Path:
    spec = {"name": "t", "base": str(BASE), "runs_dir": str(tmp_path / "runs"),
            "sweep_dir": str(tmp_path / "sweep"), **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_times_runs_with_size_table_lr_and_budgets(tmp_path):
    path = write_spec(tmp_path, grid={"size": ["4xs", "3xs"], "kind": ["ebt", "transformer"], "seed": [0, 1]},
                      runs=[{"tokens": "2.0e6"}, {"steps": 7, "lr": 5e-4}],
                      overrides={"model.architecture.context_length": 32, "trainer.grad_accum_steps": 2},
                      global_batch_size=16,
                      resources={"default": {"mem_gb": 2, "time_min": 30}, "3xs": {"nodes": 2, "partition": "big"}})
    plans = load_spec(path).plan()
    assert len(plans) == 2 * 2 * 2 * 2
    by_name = {p.name: p for p in plans}
    p = by_name["t-4xs-ebt-t2M-s1"]
    assert p.config.optim.lr == SIZES["4xs"].peak_lr  # lr defaults to the size table
    assert p.config.trainer.seed == 1 and p.config.model.kind == "ebt"
    assert p.config.trainer.micro_batch_size == 16 // (1 * 2)  # global batch / (ranks x accumulation)
    assert p.max_steps == math.ceil(2e6 / (16 * 32))
    q = by_name["t-3xs-transformer-lr0.0005-n7-s0"]
    assert q.config.optim.lr == 5e-4 and q.max_steps == 7
    assert q.resources.nodes == 2 and q.resources.partition == "big" and q.resources.mem_gb == 2.0
    assert q.config.trainer.micro_batch_size == 16 // (2 * 2)  # two nodes: half the micro batch
    assert q.tokens_per_step == 16 * 32
    # The size sets the dims even though the base config includes configs/model/4xs.yaml with explicit dims.
    assert (q.config.model.architecture.n_layers, q.config.model.architecture.n_heads,
            q.config.model.architecture.dim) == (4, 4, 256)
    assert (p.config.model.architecture.n_layers, p.config.model.architecture.dim) == (2, 128)
    # Names depend on the point only: planning again gives the same names and hashes.
    again = {p.name: p.config_hash for p in load_spec(path).plan()}
    assert again == {p.name: p.config_hash for p in plans}


def test_flops_budget_and_trainer_key_axis(tmp_path):
    path = write_spec(tmp_path, grid={"kind": ["ebt"], "flops": [1e12], "optim.warmup_steps": [3, 5]},
                      overrides={"model.architecture.context_length": 32, "trainer.micro_batch_size": 4})
    plans = load_spec(path).plan()
    assert [p.config.optim.warmup_steps for p in plans] == [3, 5]
    fpt = train_flops_per_token(plans[0].config.model)
    assert plans[0].max_steps == math.ceil(1e12 / fpt / (4 * 32))
    assert plans[0].name == "t-ebt-f1T-warmup_steps3"


def test_run_name_is_stable_and_bounded():
    assert run_name("s", {"kind": "ebt", "size": "xs", "lr": 0.001, "tokens": 2_500_000, "seed": 3}) == \
        "s-xs-ebt-lr0.001-t2.5M-s3"
    long = run_name("s", {f"trainer.k{i}": i for i in range(60)})
    assert len(long) <= 120 and long != run_name("s", {f"trainer.k{i}": i + 1 for i in range(60)})


@pytest.mark.parametrize(("fields", "message"), [
    ({"grid": {"size": ["4xs", "huge"]}}, "unknown size 'huge'"),
    ({"grid": {"kind": ["ebt", "rnn"]}}, "unknown kind 'rnn'"),
    ({"grid": {"size": []}}, "empty grid: axis 'size' has no values"),
    ({"grid": {}}, "empty grid"),
    ({"grid": {"tokens": [1e6], "steps": [3]}}, "sets several budgets"),
    ({"grid": {"sizes": ["4xs"]}}, "unknown key 'sizes'; did you mean 'size'?"),
    ({"grid": {"trainer.max_stepz": [3]}}, "unknown config key 'trainer.max_stepz'"),
    ({"grid": {"kind": ["ebt"]}, "resources": {"xxxl": {"nodes": 2}}}, "resources.xxxl: unknown size"),
    ({"grid": {"kind": ["ebt"]}, "resources": {"default": {"gpus": 2}}}, "unknown key 'gpus'"),
    ({"grid": {"kind": ["ebt"]}, "global_batch_size": 7, "resources": {"default": {"nodes": 2}}}, "not divisible"),
    ({"grid": {"kind": ["ebt"]}, "slurm": {"array_paralellism": 2}}, "did you mean 'array_parallelism'?"),
])
def test_bad_specs_fail_in_one_line(tmp_path, capsys, fields, message):
    path = write_spec(tmp_path, **fields)
    assert main(["sweep", "submit", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebt sweep: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "sweep").exists()  # nothing written


def test_missing_spec_and_base(tmp_path, capsys):
    assert main(["sweep", "status", str(tmp_path / "nope.yaml")]) == 2
    assert "sweep spec not found" in capsys.readouterr().err
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nbase: missing.yaml\ngrid: {kind: [ebt]}\n")
    assert main(["sweep", "submit", str(path), "--dry-run"]) == 2
    assert "base config not found" in capsys.readouterr().err


def test_dry_run_prints_grid_and_the_sbatch_script(tmp_path, capsys):
    path = write_spec(tmp_path, grid={"size": ["4xs", "3xs"], "kind": ["transformer"], "steps": [5]},
                      resources={"default": {"time_min": 17, "qos": "low", "account": "proj"},
                                 "3xs": {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "constraint": "h100"}},
                      slurm={"array_parallelism": 3, "setup": ["module load cuda"], "signal_delay_s": 200})
    assert main(["sweep", "submit", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "t-4xs-transformer-n5" in out and "t-3xs-transformer-n5" in out
    for line in ("#SBATCH --time=17", "#SBATCH --qos=low", "#SBATCH --account=proj", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --constraint=h100",
                 "#SBATCH --signal=USR2@200", "module load cuda", "srun --unbuffered"):
        assert line in out, line
    assert not (tmp_path / "sweep").exists()
    # The script is submitit's own rendering of the same parameters, one array per resource group.
    spec = load_spec(path)
    groups = group_runs(spec.plan())
    assert len(groups) == 2
    assert sbatch_script(spec, SweepState(spec.sweep_dir), groups[0]) in out


def test_fingerprint_difference_names_the_key(tmp_path):
    path = write_spec(tmp_path, grid={"kind": ["ebt"], "steps": [5]})
    spec = load_spec(path)
    old = plan_fingerprint(spec, spec.plan())
    path2 = write_spec(tmp_path, grid={"kind": ["ebt"], "steps": [5]}, overrides={"optim.warmup_steps": 9})
    spec2 = load_spec(path2)
    diff = first_difference(old, plan_fingerprint(spec2, spec2.plan()))
    assert diff == "runs.t-ebt-n5.overrides.optim.warmup_steps added"


def test_shipped_example_spec_plans(tmp_path, capsys):
    spec = REPO / "configs" / "sweeps" / "scaling_demo.yaml"
    assert main(["sweep", "submit", str(spec), "--dry-run", "--sweep-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.count("scaling_demo-") >= 4 and "#SBATCH --array=0-1%" in out


def test_changed_base_config_is_refused_naming_the_file(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "model").mkdir()
    base = tmp_path / "train" / "q.yaml"
    base.write_text(BASE.read_text())
    (tmp_path / "model" / "4xs.yaml").write_text((REPO / "configs" / "model" / "4xs.yaml").read_text())
    (tmp_path / "recipes").mkdir()
    for recipe in (REPO / "configs" / "recipes").glob("*.yaml"):  # the base includes one
        (tmp_path / "recipes" / recipe.name).write_text(recipe.read_text())
    path = write_spec(tmp_path, base=str(base), grid={"kind": ["ebt"], "steps": [5]})
    spec = load_spec(path)
    SweepState(spec.sweep_dir).write_plan(plan_fingerprint(spec, spec.plan()))
    (tmp_path / "model" / "4xs.yaml").write_text((tmp_path / "model" / "4xs.yaml").read_text() + "# edited\n")
    assert main(["sweep", "submit", str(path), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ebt sweep: error: sweep 't' in {tmp_path / 'sweep'} was submitted with a different spec "
                   f"(base config {tmp_path / 'model' / '4xs.yaml'} changed, run t-ebt-n5); use a new name, "
                   "or --force to replace it")


# ---------------------------------------------------------------------------------------------- issue 14
def test_points_that_clear_model_size_are_named_by_width():
    point = {"model.size": None, "model.architecture.dim": 32, "model.architecture.n_layers": 1,
             "model.architecture.n_heads": 2, "kind": "ebt",
             "tokens": 6.0e5, "seed": 0}
    name = run_name("cpu-micro", point)
    assert name == "cpu-micro-w32-ebt-t600k-s0-n_heads2-n_layers1"
    assert "None" not in run_name("m", {"model.size": None, "kind": "ebt"})


def test_status_counts_only_requeued_preemptions():
    from slurm.report import count_requeues

    def ev(*kinds):
        return [{"event": k} for k in kinds]

    # The final preemption was never requeued (requeue limit, cancel, job over): sacct shows one REQUEUED.
    assert count_requeues(ev("start", "preempted", "start", "preempted"), "TIMEOUT") == 1
    assert count_requeues(ev("start", "preempted", "start", "preempted", "cancelled"), "CANCELLED") == 1
    assert count_requeues(ev("start", "preempted", "start", "finished"), "DONE") == 1
    # Requeued and waiting to start again: it counts.
    assert count_requeues(ev("start", "preempted"), "PENDING") == 1
    assert count_requeues(ev("start", "preempted", "start", "preempted", "start"), "RUNNING") == 2


def _job(tmp_path):
    from slurm.job import TrainJob

    return TrainJob(run_name="r", config_path="c.yaml", state_dir=str(tmp_path / "state"), run_dir=str(tmp_path),
                    cwd=str(tmp_path), config_hash="h")


@pytest.mark.parametrize("flagged", [True, False])
def test_a_cancel_during_a_preemption_is_not_requeued(tmp_path, flagged):
    """scancel (SIGTERM) while checkpoint() waits for a trainer that was still starting: the trainer dies -15 and
    the job must end instead of requeueing (checkpoint returns None: submitit then raises, no requeue)."""
    import json

    job = _job(tmp_path)
    job._terminated = flagged  # the wrapper saw the SIGTERM (or only the trainer's -15 tells)
    job._rc = -15
    job._exited.set()
    assert job.checkpoint() is None
    events = [json.loads(x) for x in job.events_path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["cancelled"]
    # A trainer that checkpointed and exited 75 on the USR2 is requeued as before.
    job2 = _job(tmp_path / "b")
    job2._rc = 75
    job2._exited.set()
    assert job2.checkpoint() is not None


def test_rank_zero_waits_for_every_rank_before_requeueing(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    job = _job(tmp_path)
    timer = threading.Timer(0.6, job.record_rank_exit, args=("42", 1, 75))
    start = time.time()
    timer.start()
    ranks = job.wait_for_ranks("42", 2, known={0: 75}, timeout_s=20)
    assert ranks == {0: 75, 1: 75} and time.time() - start >= 0.5
    assert (job.ranks_dir / "42-2" / "1").read_text() == "75"
    # A rank that never exits: rank 0 gives up after the bound and reports it as None.
    assert job.wait_for_ranks("43", 2, known={0: 75}, timeout_s=0.3) == {0: 75, 1: None}
