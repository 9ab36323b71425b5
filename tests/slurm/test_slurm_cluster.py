"""Sweeps against a REAL Slurm cluster on this machine (slurm/dev-cluster.sh; 2 emulated nodes, accounting).

Every job runs the real trainer (`ebt train` per rank) on a tiny model and a small local corpus. The fixture
starts the cluster when it is not running (installing the Debian packages if missing; needs root) and stops
it again at the end if it started it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from config_copies import frozen_quickstart

from launch.cli import main
from launch.metrics import TIMING_FIELDS

REPO = Path(__file__).resolve().parents[2]
REPO_BASE = REPO / "configs" / "train" / "quickstart.yaml"
BASE = REPO_BASE  # replaced by a frozen copy for the session (see `frozen_base`)
CLUSTER = REPO / "slurm" / "dev-cluster.sh"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.fail("the Slurm dev cluster needs root (SlurmUser=root, /etc/hosts entries)")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    proc = subprocess.run([str(CLUSTER), "start", "--nodes", "2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_up:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="session", autouse=True)
def frozen_base(tmp_path_factory):
    """A private copy of the base config and the size files it includes: a sweep's identity includes its base
    config files, and an edit to the repo's quickstart during the session must not change a run mid-test."""
    global BASE
    BASE = frozen_quickstart(tmp_path_factory.mktemp("configs"))
    yield BASE
    BASE = REPO_BASE


@pytest.fixture(scope="session")
def data_overrides(tmp_path_factory):
    """A ~300 KB corpus of many small documents (real Python source), tokenized once for every test."""
    import sysconfig

    from data_pipeline import prepare_if_needed
    from launch.config import load_config

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(errors="ignore")
        docs.extend(text[i:i + 1500] for i in range(0, min(len(text), 6000), 1500))
        if sum(map(len, docs)) > 300_000:
            break
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    overrides = {"data.source": str(corpus), "data.cache_dir": str(root / "cache"), "data.val_fraction": 0.1,
                 "data.vocab_size": 512, "data.progress": False, "model.architecture.context_length": 32,
                 "trainer.micro_batch_size": 4, "trainer.eval_every": 0, "trainer.eval_batches": 2,
                 "trainer.log_every": 1, "trainer.peak_flops": 1.0e10, "logging.wandb": False,
                 "logging.progress": False, "checkpoint.every": 1000}
    cfg = load_config([BASE], [f"{k}={v}" for k, v in overrides.items()])
    prepare_if_needed(cfg.data)
    return overrides


@pytest.fixture
def sweep_env(tmp_path, monkeypatch, slurm_cluster, data_overrides):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


# ---------------------------------------------------------------------------------------------- helpers
def write_spec(root: Path, name: str, grid: dict, overrides: dict, **fields) -> Path:
    spec = {"name": name, "base": str(BASE), "runs_dir": str(root / "runs"), "sweep_dir": str(root / name),
            "grid": grid, "overrides": overrides,
            "resources": {"default": {"mem_gb": 1, "time_min": 10, "cpus_per_task": 1}}, **fields}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def jobs_of(sweep_dir: Path) -> dict:
    path = sweep_dir / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def events(sweep_dir: Path, run: str) -> list[str]:
    path = sweep_dir / "state" / f"{run}.attempts.jsonl"
    return [json.loads(x)["event"] for x in path.read_text().splitlines()] if path.is_file() else []


def done(sweep_dir: Path, runs: list[str]) -> bool:
    return all((sweep_dir / "state" / f"{r}.result.json").is_file() for r in runs)


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def job_log(sweep_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((sweep_dir / "submitit").glob("*.err")))


def reference_run(config: Path, root: Path, name: str, *overrides: str) -> subprocess.Popen:
    """The same run, uninterrupted and on one process, with the trainer's own CLI."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), f"name={name}",
                             f"runs_dir={root / 'ref'}", *overrides], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def sweep_status(spec: Path) -> list[dict]:
    from slurm.report import status
    from slurm.spec import load_spec

    return status(load_spec(spec), out=lambda _: None, as_json=True)


def sacct_states(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True,
                         text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]  # "CANCELLED by 0" is one state


# ---------------------------------------------------------------------------------------------- tests
def test_micro_sweep_completes_and_resubmit_skips_finished_runs(sweep_env, data_overrides, capsys):
    root = sweep_env
    spec = write_spec(root, "micro", {"size": ["4xs", "3xs"], "kind": ["ebt", "transformer"], "steps": [3]},
                      data_overrides, slurm={"array_parallelism": 4})
    runs = ["micro-4xs-ebt-n3", "micro-4xs-transformer-n3", "micro-3xs-ebt-n3", "micro-3xs-transformer-n3"]
    assert main(["sweep", "submit", str(spec)]) == 0
    jobs = jobs_of(root / "micro")
    assert sorted(jobs) == sorted(runs)
    ids = [jobs[r][0]["job_id"] for r in runs]
    assert len({i.split("_")[0] for i in ids}) == 1  # same resources: one job array for all four runs
    # Cancel one array task at once: it must count as failed and be resubmitted later.
    cancelled = jobs["micro-3xs-transformer-n3"][0]["job_id"]
    subprocess.run(["scancel", cancelled], check=True)
    wait_until(lambda: done(root / "micro", runs[:3]), 300, "3 runs to finish")
    capsys.readouterr()
    assert main(["sweep", "status", str(spec), "--json"]) == 0
    table = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert [table[r]["state"] for r in runs[:3]] == ["DONE"] * 3
    # A pending array task cancelled before it started leaves no record in squeue or sacct.
    assert table["micro-3xs-transformer-n3"]["state"] in ("LOST", "CANCELLED")

    # Resubmit: finished runs are skipped, the cancelled one goes out again.
    assert main(["sweep", "submit", str(spec)]) == 0
    out = capsys.readouterr().out
    for r in runs[:3]:
        assert f"skip {r}: finished" in out
    assert "submitted micro-3xs-transformer-n3" in out
    jobs = jobs_of(root / "micro")
    assert [len(jobs[r]) for r in runs] == [1, 1, 1, 2]
    wait_until(lambda: done(root / "micro", runs), 240, "the resubmitted run")

    # Everything finished: a third submit queues nothing.
    assert main(["sweep", "submit", str(spec)]) == 0
    assert "submitted" not in capsys.readouterr().out
    assert [len(jobs_of(root / "micro")[r]) for r in runs] == [1, 1, 1, 2]
    for r in runs:
        final = metric_rows(root / "runs" / r)[-1]
        assert final["final"] is True and final["step"] == 3 and math.isfinite(final["val_loss"])

    assert main(["sweep", "collect", str(spec)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(root / "micro" / "results.parquet").to_pylist()
    assert sorted(r["run"] for r in table) == sorted(runs)
    assert all(r["finished"] and r["step"] == 3 and r["train_flops"] > 0 for r in table)
    assert {(r["size"], r["kind"]) for r in table} == {(s, k) for s in ("4xs", "3xs") for k in ("ebt", "transformer")}
    params = {(r["size"], r["kind"]): r["params"] for r in table}
    assert params["3xs", "transformer"] > 2 * params["4xs", "transformer"]  # 3xs trained with its own dims
    csv_text = (root / "micro" / "results.csv").read_text()
    assert csv_text.startswith("run,sweep,size,kind,lr") and csv_text.count("\n") == 5

    # A changed spec under the same name is refused; --force accepts it (finished runs stay finished).
    spec2 = write_spec(root, "micro", {"size": ["4xs", "3xs"], "kind": ["ebt", "transformer"], "steps": [3]},
                       data_overrides, slurm={"array_parallelism": 2})
    assert main(["sweep", "submit", str(spec2)]) == 2
    err = capsys.readouterr().err.strip()
    assert "different spec (slurm.array_parallelism: 4 -> 2)" in err and "--force" in err and "\n" not in err
    assert main(["sweep", "submit", str(spec2), "--force"]) == 0
    assert "submitted" not in capsys.readouterr().out


def test_two_node_ddp_matches_one_rank_across_a_preemption(sweep_env, data_overrides):
    root = sweep_env
    # Long enough that the USR2 lands mid-run: a 4xs Transformer++ step takes tens of ms, and a 60-step run once
    # finished before the signal reached it (events ['start', 'finished']).
    steps = 300
    over = {k: v for k, v in data_overrides.items() if k != "trainer.micro_batch_size"}
    spec = write_spec(root, "ddp", {"size": ["4xs"], "kind": ["transformer"], "steps": [steps]}, over,
                      global_batch_size=8,
                      resources={"default": {"nodes": 2, "tasks_per_node": 1, "mem_gb": 1, "time_min": 10}})
    run = f"ddp-4xs-transformer-n{steps}"
    assert main(["sweep", "submit", str(spec)]) == 0
    job_id = jobs_of(root / "ddp")[run][0]["job_id"]
    # Meanwhile: the same global batch of 8 on one process.
    ref = reference_run(root / "ddp" / "configs" / f"{run}.yaml", root, "one-rank", "trainer.micro_batch_size=8")
    # Preempt the 2-node job mid-run: both ranks checkpoint together, rank 0 requeues, both resume.
    metrics = root / "runs" / run / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 300, "3 logged steps")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: done(root / "ddp", [run]), 300, f"the 2-node run\n{job_log(root / 'ddp')}")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert events(root / "ddp", run) == ["start", "preempted", "start", "finished"]
    # Every rank ended cleanly: rank 0 requeued only after both trainers had exited 75, and no step FAILED.
    preempted = json.loads((root / "ddp" / "state" / f"{run}.attempts.jsonl").read_text().splitlines()[1])
    assert preempted["ranks"] == {"0": 75, "1": 75}, preempted
    assert "trainer exited with code" not in job_log(root / "ddp")
    steps_states = subprocess.run(["sacct", "-D", "-n", "-P", "-o", "JobID,State", "-j", job_id],
                                  capture_output=True, text=True).stdout.split()
    assert not [s for s in steps_states if "FAILED" in s], steps_states
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "NNodes,NodeList", "-j", job_id],
                           capture_output=True, text=True).stdout.split()
    assert nodes and nodes[0].startswith("2|"), nodes  # two Slurm nodes, one task each
    assert json.loads((root / "ddp" / "state" / f"{run}.attempts.jsonl").read_text().splitlines()[0])["world_size"] == 2

    two, one = metric_rows(root / "runs" / run), metric_rows(root / "ref" / "one-rank")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [*range(1, steps + 1), steps]
    assert two[-1]["tokens"] == one[-1]["tokens"] == steps * 8 * 32
    for a, b in zip(two[:-1], one[:-1], strict=True):
        # The all-reduced gradient equals the one-rank gradient: same norm before clipping, same loss.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5, abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    from launch.run_dir import load_model

    m2, _ = load_model(root / "runs" / run / "checkpoints" / f"step_{steps}")
    m1, _ = load_model(root / "ref" / "one-rank" / "checkpoints" / f"step_{steps}")
    for (name, p2), (_, p1) in zip(m2.state_dict().items(), m1.state_dict().items(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5, msg=name)


def test_usr2_preemption_requeues_and_matches_uninterrupted_run(sweep_env, data_overrides):
    root = sweep_env
    # Long enough that the USR2 lands mid-run: a 4xs step takes ~0.1 s, and a 40-step run once ended between the
    # status read below and the signal (the preemption checkpoint was then the final step's).
    steps = 200
    spec = write_spec(root, "pre", {"size": ["4xs"], "kind": ["ebt"], "steps": [steps]}, data_overrides)
    run = f"pre-4xs-ebt-n{steps}"
    assert main(["sweep", "submit", str(spec)]) == 0
    job_id = jobs_of(root / "pre")[run][0]["job_id"]
    ref = reference_run(root / "pre" / "configs" / f"{run}.yaml", root, "uninterrupted")
    metrics = root / "runs" / run / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4, 300, "4 logged steps")
    (row,) = sweep_status(spec)  # in-process: quick enough to catch the run in flight
    assert row["state"] == "RUNNING" and 4 <= row["step"] < steps and row["eta_s"] > 0 and row["requeues"] == 0
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_until(lambda: done(root / "pre", [run]), 300, f"the requeued run\n{job_log(root / 'pre')}")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert events(root / "pre", run) == ["start", "preempted", "start", "finished"]
    assert "REQUEUED" in sacct_states(job_id)
    resumed = sorted(int(p.name.split("_")[1]) for p in (root / "runs" / run / "checkpoints").iterdir())
    assert 4 <= resumed[0] < steps  # the preemption checkpoint, then the final one
    assert metric_rows(root / "runs" / run) == metric_rows(root / "ref" / "uninterrupted")
    status = subprocess.run([sys.executable, "-m", "launch.cli", "sweep", "status", str(spec), "--json"],
                            capture_output=True, text=True, check=True)
    (row,) = json.loads(status.stdout)
    assert row["state"] == "DONE" and row["requeues"] == 1 and row["attempts"] == 2 and row["step"] == steps


def _seconds_per_step(root: Path, overrides: dict) -> float:
    """This machine's speed now (median step), so the time-limited run is long enough to be cut."""
    spec = write_spec(root, "calib", {"size": ["4xs"], "kind": ["ebt"], "steps": [20]}, overrides)
    from slurm.spec import load_spec
    from slurm.state import SweepState
    from slurm.submit import _write_configs

    plans = load_spec(spec).plan()
    _write_configs(SweepState(root / "calib"), plans)
    proc = reference_run(root / "calib" / "configs" / f"{plans[0].name}.yaml", root, "calib")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    times = [json.loads(x)["time"] for x in (root / "ref" / "calib" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    steps = sorted(b - a for a, b in zip(times[4:], times[5:], strict=False))
    return steps[len(steps) // 2]


def test_time_limit_signal_requeues_and_finishes(sweep_env, data_overrides):
    root = sweep_env
    # Slurm's timer ticks every 30 s and sends the --signal at the last tick before (time limit - delay), so
    # with --time=1 and USR2@25 it arrives 5-35 s after the start, and the kill follows at a later tick. The
    # run trains for ~45 s (at the speed measured now) after a few seconds of start-up, so it is always cut.
    # Once it has been cut and requeued, the test raises the limit so that the rest runs in one more attempt
    # instead of several (only to bound the test's wall time).
    steps = int(min(3000, max(60, 45 / _seconds_per_step(root, data_overrides))))
    spec = write_spec(root, "tl", {"size": ["4xs"], "kind": ["ebt"], "steps": [steps]}, data_overrides,
                      resources={"default": {"mem_gb": 1, "time_min": 1}}, slurm={"signal_delay_s": 25})
    from slurm.spec import load_spec

    # The name as the sweep plans it: step counts of 1,000 and more print as e.g. "n1.244k".
    (plan,) = load_spec(spec).plan()
    run = plan.name
    assert main(["sweep", "submit", str(spec)]) == 0
    job_id = jobs_of(root / "tl")[run][0]["job_id"]
    wait_until(lambda: "preempted" in events(root / "tl", run), 300, f"the time limit\n{job_log(root / 'tl')}")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    wait_until(lambda: done(root / "tl", [run]), 400, f"the time-limited run\n{job_log(root / 'tl')}", poll=2)
    (row,) = sweep_status(spec)
    ev = events(root / "tl", run)
    assert row["state"] == "DONE" and row["requeues"] == 1 and row["step"] == steps
    assert ev == ["start", "preempted", "start", "finished"]
    assert sacct_states(job_id).count("REQUEUED") == 1
    # Nobody but Slurm's time-limit timer sent a signal, and it came at a timer tick inside the 1 min limit.
    times = [json.loads(x)["time"] for x in (root / "tl" / "state" / f"{run}.attempts.jsonl").read_text().splitlines()]
    assert 0 <= times[1] - times[0] <= 50
    final = metric_rows(root / "runs" / run)[-1]
    assert final["final"] and final["step"] == steps
    # Resume was exact: the step sequence has no gaps and no repeats.
    assert [r["step"] for r in metric_rows(root / "runs" / run)[:-1]] == list(range(1, steps + 1))


def test_bad_partition_is_reported_with_the_run_and_nothing_is_queued(sweep_env, data_overrides, capsys):
    root = sweep_env
    spec = write_spec(root, "badpart", {"size": ["4xs", "3xs"], "kind": ["ebt"], "steps": [3]}, data_overrides,
                      resources={"default": {"mem_gb": 1, "time_min": 5}, "3xs": {"partition": "nosuchpart"}})
    before = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
    assert main(["sweep", "submit", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebt sweep: error: run 'badpart-3xs-ebt-n3': sbatch: error:")
    assert "invalid partition" in err.lower() and "\n" not in err
    assert jobs_of(root / "badpart") == {}  # the valid 4xs group was not submitted either
    assert not (root / "badpart" / "plan.json").exists()
    after = set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
    assert after <= before  # no new job


def test_no_slurm_on_path_suggests_local_which_works(sweep_env, data_overrides, capsys, monkeypatch):
    root = sweep_env
    spec = write_spec(root, "loc", {"size": ["4xs"], "kind": ["transformer"], "steps": [3]}, data_overrides)
    monkeypatch.setenv("PATH", str(root / "empty-bin"))
    assert shutil.which("sbatch") is None
    assert main(["sweep", "submit", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ebt sweep: error: no Slurm found on PATH (sbatch); run the sweep on this machine with --local"
    assert not (root / "loc").exists()
    # --local: the same sweep through submitit's local executor; it waits for the runs.
    assert main(["sweep", "submit", str(spec), "--local"]) == 0
    run = "loc-4xs-transformer-n3"
    assert done(root / "loc", [run]), job_log(root / "loc")
    assert jobs_of(root / "loc")[run][0]["executor"] == "local"
    assert metric_rows(root / "runs" / run)[-1]["step"] == 3
    assert main(["sweep", "submit", str(spec), "--local"]) == 0
    assert f"skip {run}: finished" in capsys.readouterr().out


def test_dev_cluster_is_idempotent_and_stop_touches_only_its_own_daemons(slurm_cluster, tmp_path):
    # pytest's tmp dirs are 0700, below which munged refuses its socket: the script says so in one line.
    env = {**os.environ, "EBT_DEV_CLUSTER_DIR": str(tmp_path / "c2"), "EBT_DEV_CLUSTER_PORT_BASE": "18400"}
    refused = subprocess.run([str(CLUSTER), "start", "--nodes", "1"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "traversable by all (o+x)" in refused.stderr

    out = subprocess.run([str(CLUSTER), "start", "--nodes", "2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "already running" in out.stderr
    assert out.stdout.strip() == f"SLURM_CONF={slurm_cluster}"
    bad = subprocess.run([str(CLUSTER), "start", "--nodes", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "already running with 2 nodes" in bad.stderr
    bad = subprocess.run([str(CLUSTER), "start", "--nodes", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == "dev-cluster: error: --nodes needs a number 1-99, got 'x'"

    # A second, private cluster next to the first one: start it, run a job on it, stop it.
    second = Path(tempfile.mkdtemp(prefix="ebt-dev-cluster-test-", dir="/tmp"))
    second.chmod(0o755)
    env["EBT_DEV_CLUSTER_DIR"] = str(second)
    main_pids = sorted((Path(slurm_cluster).parents[1] / "run").glob("*.pid"))
    try:
        _second_cluster_round_trip(env, second, slurm_cluster)
    finally:  # never leave the second cluster's daemons behind, even when an assertion failed
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(second, ignore_errors=True)
    # The first cluster is untouched.
    for pidfile in main_pids:
        os.kill(int(pidfile.read_text()), 0)
    assert subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0


def _second_cluster_round_trip(env: dict, second: Path, first_conf: str) -> None:
    up = subprocess.run([str(CLUSTER), "start", "--nodes", "1"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, up.stderr
    conf2 = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    assert conf2 != first_conf
    pids2 = [int(p.read_text()) for p in second.rglob("*.pid")]
    assert len(pids2) == 5  # munged, mariadbd, slurmdbd, slurmctld, one slurmd
    hosts = Path("/etc/hosts").read_text()
    assert f"# ebt-dev-cluster {second}" in hosts
    run = subprocess.run(["srun", "-N1", "printenv", "SLURMD_NODENAME"], env={**env, "SLURM_CONF": conf2},
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "n1", run.stderr
    down = subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for pid in pids2:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert f"# ebt-dev-cluster {second}" not in Path("/etc/hosts").read_text()


def test_scancel_right_after_a_usr2_during_start_up_stays_cancelled(sweep_env, data_overrides):
    """USR2 (time limit / preemption) while the trainer is still starting, then `scancel JOB` seconds later: the
    job must end CANCELLED and never start again (it used to be requeued, twice)."""
    root = sweep_env
    spec = write_spec(root, "cancel", {"size": ["4xs"], "kind": ["ebt"], "steps": [400]}, data_overrides)
    run = "cancel-4xs-ebt-n400"
    assert main(["sweep", "submit", str(spec)]) == 0
    job_id = jobs_of(root / "cancel")[run][0]["job_id"]
    wait_until(lambda: "start" in events(root / "cancel", run), 300, "the job to start")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # the trainer is still importing torch
    time.sleep(2)
    subprocess.run(["scancel", job_id], check=True)
    wait_until(lambda: sacct_states(job_id) and sacct_states(job_id)[-1] not in ("RUNNING", "PENDING", "REQUEUED"),
               120, "the job to end")
    time.sleep(30)  # a requeued job would be pending or running again by now (cred_expire 10 s + a pass)
    states = sacct_states(job_id)
    assert "REQUEUED" not in states and states[-1] == "CANCELLED", states
    assert events(root / "cancel", run).count("start") == 1, events(root / "cancel", run)
    (row,) = sweep_status(spec)
    assert row["requeues"] == 0


def test_paper_ladder_cpu_stand_in_runs_end_to_end(sweep_env, data_overrides, tmp_path):
    """configs/sweeps/paper-ladder-cpu.yaml (the paper ladder at tiny widths, 1 CPU per run) through submit,
    status and collect on the dev cluster; its data comes from the session's small corpus."""
    root = sweep_env
    data = {k: v for k, v in data_overrides.items() if k.startswith("data.")}
    spec = root / "ladder.yaml"
    spec.write_text(yaml.safe_dump({"extends": str(REPO / "configs" / "sweeps" / "paper-ladder-cpu.yaml"),
                                    "name": "ladder", "runs_dir": str(root / "runs"),
                                    "sweep_dir": str(root / "ladder"), "overrides": data}))
    from slurm.spec import load_spec

    runs = [p.name for p in load_spec(spec).plan()]
    assert len(runs) == 24
    assert main(["sweep", "submit", str(spec)]) == 0
    wait_until(lambda: done(root / "ladder", runs), 1500, f"24 runs\n{job_log(root / 'ladder')}", poll=5)
    table = sweep_status(spec)
    assert all(r["state"] == "DONE" and r["step"] == r["max_steps"] for r in table)
    assert main(["sweep", "collect", str(spec)]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "ladder" / "results.parquet").to_pylist()
    assert len(rows) == 24 and all(r["finished"] and math.isfinite(r["val_loss"]) for r in rows)
    assert {r["size"] for r in rows} == {"small", "medium", "large", "xl"}
