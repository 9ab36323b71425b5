"""`ebt eval` end to end on local files: a real tokenizer, saved checkpoints, OOD source, JSON into the report."""

from __future__ import annotations

import dataclasses
import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from model_configs import model_config
from safetensors.torch import save_model

from data_pipeline import DataConfig, prepare_if_needed
from ebt import build_model
from eval.report import build_report
from launch.cli import main

torch.set_num_threads(1)
CTX = 16
WORDS = ("the of and a to in is was he for it with as his on be at by had are but from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    code, prose = root / "code", root / "prose"
    code.mkdir()
    prose.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, name in enumerate(["textwrap.py", "bisect.py", "colorsys.py", "fnmatch.py", "keyword.py", "heapq.py",
                              "shlex.py", "glob.py", "string.py", "numbers.py"]):
        text = (stdlib / name).read_text(encoding="utf-8")
        (code / f"{i}.txt").write_text("".join(c for c in text if ord(c) < 128)[:8000])
    rng = random.Random(0)
    for i in range(6):
        (prose / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)).capitalize() + ".\n")
    data = DataConfig(source=str(code), mode="stream", vocab_size=512, cache_dir=str(root / "cache"),
                      val_fraction=0.3, num_proc=1, progress=False)
    info = prepare_if_needed(data)
    checkpoints = {}
    for kind in ("ebt", "transformer"):
        torch.manual_seed(0)
        cfg = model_config(kind=kind, vocab_size=info["vocab_size"], context_length=CTX, dim=32, n_layers=1,
                          n_heads=2, alpha_init=5.0)
        out = root / f"ckpt-{kind}"
        out.mkdir()
        save_model(build_model(cfg), str(out / "model.safetensors"))
        # A checkpoint-style config.yaml: model plus the data section it was trained on.
        (out / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg),
                                                         "data": dataclasses.asdict(data)}))
        checkpoints[kind] = out
    return {"root": root, "code": code, "prose": prose, "ckpt": checkpoints, "tokenizer": info["tokenizer"]}


ARGS = ["--steps", "0,1", "--samples", "1,2", "--max-batches", "2", "--batch-size", "2", "--no-progress"]


def test_ebt_eval_on_training_data_and_an_ood_source(setup, capsys):
    out = setup["root"] / "ebt-eval.json"
    argv = ["eval", "--checkpoint", str(setup["ckpt"]["ebt"]), "--ood", str(setup["prose"]), "--out", str(out), *ARGS]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "thinking gain" in stdout and "(OOD)" in stdout and f"wrote {out}" in stdout
    result = json.loads(out.read_text())
    assert result["schema"] == "ebt-eval/1" and result["kind"] == "ebt" and result["mcmc_steps"] == 2
    names = [(s["name"], s["ood"], s["split"]) for s in result["sources"]]
    assert names == [(f"{setup['code']} (val)", False, "val"), ("prose", True, "train")]
    for src in result["sources"]:
        assert src["tokens"] == 2 * 2 * CTX
        # steps {0, 1} x samples {1, 2} x selections x accept-lower, deduplicated, plus the 2-step baseline
        assert len(src["grid"]) == 1 + 2 + 2 + 4 + 1
        assert src["base"]["steps"] == 2 and src["gain_pct"] == pytest.approx(src["best"]["gain_pct"])
    again = setup["root"] / "ebt-eval-2.json"
    assert main([*argv[:-len(ARGS) - 2], "--out", str(again), *ARGS]) == 0
    assert json.loads(again.read_text())["sources"] == result["sources"]


def test_transformer_eval_reports_plain_perplexity(setup, capsys):
    out = setup["root"] / "tpp-eval.json"
    assert main(["eval", "--checkpoint", str(setup["ckpt"]["transformer"]), "--out", str(out), *ARGS]) == 0
    src = json.loads(out.read_text())["sources"][0]
    assert src["grid"] == [] and src["plain"]["ppl"] > 1 and src["gain_pct"] is None


def test_eval_json_feeds_the_report(setup, tmp_path):
    runs = tmp_path / "runs"
    for kind in ("ebt", "transformer"):
        for i, size in enumerate(["4xs", "3xs", "xxs"]):
            run = runs / f"{kind}-{size}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(yaml.safe_dump({"name": run.name, "model": {
                "kind": kind, "size": size, "architecture": {"vocab_size": 256, "context_length": 32,
                                                             "dim": 64 * (i + 1), "n_layers": 2, "n_heads": 2}}}))
            rows = [{"step": 1, "tokens": 1000, "loss": 6.0}, {"step": 1, "tokens": 1000, "final": True,
                                                               "val_loss": 3.0 + 2.0 / (i + 1)}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind in ("ebt", "transformer"):
        assert main(["eval", "--checkpoint", str(setup["ckpt"][kind]), "--ood", str(setup["prose"]),
                     "--out", str(runs / f"{kind}-xxs" / "eval.json"), *ARGS]) == 0
    result = build_report([runs], tmp_path / "report", n_boot=0, progress=False)
    assert {"system2_gain.png", "ood_gain.png"} <= set(result.figures)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| prose | yes |" in md


def test_export_dir_without_data_config_needs_tokenizer(setup, tmp_path, capsys):
    bare = tmp_path / "export"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((setup["ckpt"]["ebt"] / "model.safetensors").read_bytes())
    cfg = yaml.safe_load((setup["ckpt"]["ebt"] / "config.yaml").read_text())
    (bare / "config.yaml").write_text(yaml.safe_dump({"model": cfg["model"]}))
    assert main(["eval", "--checkpoint", str(bare), "--data", str(setup["code"]), "--out", str(tmp_path / "e.json"),
                 *ARGS]) == 2
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(bare), "--data", str(setup["code"]), "--tokenizer",
                 setup["tokenizer"], "--split", "all", "--out", str(tmp_path / "e.json"), *ARGS]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["sources"][0]["split"] == "train"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "/nonexistent/ckpt"], "no such checkpoint or run directory: /nonexistent/ckpt"),
        (["--ood", "/nonexistent/prose"], "data source path '/nonexistent/prose' does not exist"),
        (["--selection", "best"], "unknown selection 'best'"),
    ],
)
def test_eval_errors_are_one_line(setup, tmp_path, capsys, extra, message):
    argv = ["eval", "--checkpoint", str(setup["ckpt"]["ebt"]), "--out", str(tmp_path / "e.json"), *ARGS, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebt eval: error:") and message in err and "\n" not in err
    assert not (tmp_path / "e.json").exists()


def _eval_argv_for_untrained(ckpt, vocab_size: int, setup, out) -> list[str]:
    """`ebt eval` arguments for an untrained EBT of `vocab_size` saved as a run dir at `ckpt`."""
    cfg = model_config(kind="ebt", vocab_size=vocab_size, context_length=CTX, dim=32, n_layers=1, n_heads=2)
    ckpt.mkdir()
    save_model(build_model(cfg), str(ckpt / "model.safetensors"))
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(cfg)}))
    return ["eval", "--checkpoint", str(ckpt), "--data", str(setup["code"]), "--tokenizer", setup["tokenizer"],
            "--out", str(out), *ARGS]


def test_tokenizer_larger_than_the_model_vocab_is_refused(setup, tmp_path, capsys):
    argv = _eval_argv_for_untrained(tmp_path / "small-vocab", 256, setup, tmp_path / "e.json")
    assert main(argv) == 2
    assert "but the model's vocab_size is 256" in capsys.readouterr().err


def test_identical_chains_are_flagged(setup, tmp_path, capsys):
    """init_logit_std=0 without --noise: every sample is the same chain, which the grid would silently repeat."""
    cfg_path = setup["ckpt"]["ebt"] / "config.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model"]["thinking"]["init_logit_std"] = 0.0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((setup["ckpt"]["ebt"] / "model.safetensors").read_bytes())
    (ckpt / "config.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(out), *ARGS]) == 0
    assert "all samples of a cell are the same chain" in capsys.readouterr().err
    cells = json.loads(out.read_text())["sources"][0]["grid"]
    grid = {(g["steps"], g["samples"], g["selection"]): g["loss"] for g in cells}
    assert grid[(1, 2, "min")] == grid[(1, 1, "none")]  # what the warning is about
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(out), "--noise", "0.5", *ARGS]) == 0
    assert "same chain" not in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--ood", "--data"])
def test_a_glob_that_matches_nothing_fails_before_any_evaluation(setup, tmp_path, capsys, monkeypatch, option):
    import eval.evaluate

    evaluated = []
    monkeypatch.setattr(eval.evaluate, "evaluate_batches", lambda *a, **k: evaluated.append(a) or {})
    glob = str(tmp_path / "nothing" / "*.txt")
    out = tmp_path / "e.json"
    argv = ["eval", "--checkpoint", str(setup["ckpt"]["ebt"]), option, glob, "--out", str(out), *ARGS]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebt eval: error:") and f"{option} {glob}:" in err and "matched no files" in err
    assert "\n" not in err
    assert evaluated == [] and not out.exists() and list(tmp_path.iterdir()) == []


def test_tokenizer_or_shards_of_another_vocabulary_are_refused(setup, tmp_path, capsys):
    """A smaller tokenizer (ids in range, so nothing would crash) or shards of a 400-piece vocabulary for a
    512-piece model: one line naming both sizes, nothing evaluated."""
    argv = _eval_argv_for_untrained(tmp_path / "big-vocab", 1024, setup, tmp_path / "e.json")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "has 512 pieces but the model's vocab_size is 1024" in err and "\n" not in err

    other = prepare_if_needed(DataConfig(source=str(setup["code"]), mode="shards", vocab_size=400,
                                         cache_dir=str(setup["root"] / "cache400"), val_fraction=0.3, num_proc=1,
                                         progress=False))
    argv = ["eval", "--checkpoint", str(setup["ckpt"]["ebt"]), "--data", other["shards_dir"],
            "--out", str(tmp_path / "e.json"), *ARGS]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "400-piece vocabulary but the model's vocab_size is 512" in err and "\n" not in err
    assert not (tmp_path / "e.json").exists()


def test_progress_lines_when_stderr_is_not_a_terminal(setup, tmp_path, capsys):
    """A Slurm log gets plain lines with an ETA (capsys' stderr is not a terminal)."""
    args = [a for a in ARGS if a != "--no-progress"]
    assert main(["eval", "--checkpoint", str(setup["ckpt"]["transformer"]), "--out", str(tmp_path / "e.json"),
                 *args]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ebt eval: eval ")]
    assert lines == [f"ebt eval: eval {setup['code']} (val): 1/2 batches (50%), 0:00:00 elapsed, ETA 0:00:00",
                     f"ebt eval: eval {setup['code']} (val): 2/2 batches (100%), 0:00:00 elapsed, ETA 0:00:00"]


def test_eval_progress_counts_batches_and_is_silent_when_disabled():
    import io

    from eval.evaluate import EvalProgress

    stream = io.StringIO()
    with EvalProgress(stream=stream, lines_per_source=2) as bar:
        task = bar.start("eval x", 4, cells_per_batch=3)
        for _ in range(4 * 3):
            bar.advance(task)
        bar.finish(task)
        unknown = bar.start("eval y", None, cells_per_batch=1)
        for _ in range(3):
            bar.advance(unknown)
        bar.finish(unknown)
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["ebt eval: eval x: 2/4 batches (50%)",
                                                     "ebt eval: eval x: 4/4 batches (100%)",
                                                     "ebt eval: eval y: 2 batches", "ebt eval: eval y: 3 batches"]
    quiet = io.StringIO()
    with EvalProgress(enabled=False, stream=quiet) as bar:
        task = bar.start("eval x", 4, cells_per_batch=1)
        bar.advance(task)
        bar.finish(task)
    assert quiet.getvalue() == ""


def test_default_grid_skips_sample_counts_that_cannot_differ(setup, tmp_path, capsys):
    """init_logit_std=0, no --noise and no --samples: one sample per cell, and one note saying why."""
    raw = yaml.safe_load((setup["ckpt"]["ebt"] / "config.yaml").read_text())
    raw["model"]["thinking"]["init_logit_std"] = 0.0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((setup["ckpt"]["ebt"] / "model.safetensors").read_bytes())
    (ckpt / "config.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "eval.json"
    args = [a for a in ARGS if a not in ("--samples", "1,2")]
    assert main(["eval", "--checkpoint", str(ckpt), "--ood", str(setup["prose"]), "--out", str(out), *args]) == 0
    err = capsys.readouterr().err
    assert err.count("evaluating 1 sample only") == 1 and "warning" not in err
    result = json.loads(out.read_text())
    assert result["settings"]["samples"] == [1]
    for src in result["sources"]:
        assert {g["samples"] for g in src["grid"]} == {1} and len(src["grid"]) == 1 + 2 + 1
    assert main(["eval", "--checkpoint", str(setup["ckpt"]["ebt"]), "--out", str(out), *args]) == 0
    assert "1 sample only" not in capsys.readouterr().err  # random starts: the default 1,2,4 samples
    assert json.loads(out.read_text())["settings"]["samples"] == [1, 2, 4]
