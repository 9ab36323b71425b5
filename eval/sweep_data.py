"""Read what a sweep produced: the collected CSV (`ebt sweep collect`), run dirs, their metrics.jsonl and eval JSONs.

Every input becomes a `RunRecord`; `screen` then decides which records may enter a fit and says why the others
may not. Nothing here fits or plots, so the report can be tested on hand-written fixtures.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsutil import read_metrics_rows

# Columns of slurm.report.COLLECT_COLUMNS that the report needs. Others are read when present.
REQUIRED_COLUMNS = ("run", "kind", "size", "params", "tokens", "train_flops", "train_loss", "val_loss", "finished")
KINDS = ("ebt", "transformer")
LOSS_COLUMNS = ("val_loss", "train_loss")
EVAL_SCHEMA = "ebt-eval/1"
RESULTS_NAME = "results.csv"


@dataclass
class RunRecord:
    run: str
    kind: str
    size: str
    n_params: float
    tokens: float
    flops: float  # total training FLOPs, EBT-aware (ebt.flops), each kind its own count
    train_loss: float
    val_loss: float
    finished: bool
    state: str = ""
    seed: str = ""
    budget_flops: float = math.nan
    budget_tokens: float = math.nan
    run_dir: Path | None = None
    source: str = ""  # the CSV or run dir this record came from

    def loss(self, column: str) -> float:
        return self.val_loss if column == "val_loss" else self.train_loss


@dataclass
class Exclusion:
    run: str
    reason: str


@dataclass
class SweepInputs:
    records: list[RunRecord] = field(default_factory=list)
    eval_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _float(value: Any) -> float:
    """CSV cells and metrics.jsonl values ("nan"/"inf" are written as strings) to float; blank -> NaN."""
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _bool(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def load_results_csv(path: str | Path) -> list[RunRecord]:
    """Rows of a collected sweep (.csv, or the .parquet twin); a missing column is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns, rows = table.column_names, table.to_pylist()
    else:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns, rows = list(reader.fieldnames or []), list(reader)
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise ValueError(f"{path}: missing column '{column}' (written by `ebt sweep collect`)")
    sweep_dir = path.parent
    records = []
    for row in rows:
        tokens, flops = _float(row["tokens"]), _float(row["train_flops"])
        if math.isnan(flops) and not math.isnan(tokens):
            flops = tokens * _float(row.get("flops_per_token"))
        records.append(
            RunRecord(
                run=str(row["run"]),
                kind=str(row["kind"]),
                size=str(row["size"] or ""),
                n_params=_float(row["params"]),
                tokens=tokens,
                flops=flops,
                train_loss=_float(row["train_loss"]),
                val_loss=_float(row["val_loss"]),
                finished=_bool(row["finished"]),
                state=str(row.get("state") or ""),
                seed=str(row.get("seed") if row.get("seed") is not None else ""),
                budget_flops=_float(row.get("budget_flops")),
                budget_tokens=_float(row.get("budget_tokens")),
                run_dir=_locate_run_dir(sweep_dir, str(row["run"])),
                source=str(path),
            )
        )
    return records


def _locate_run_dir(sweep_dir: Path, run: str) -> Path | None:
    """The run dir named by the sweep's saved trainer config (<sweep>/configs/<run>.yaml), else a guess."""
    candidates = []
    config = sweep_dir / "configs" / f"{run}.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        runs_dir, name = Path(str(data.get("runs_dir", "runs"))), str(data.get("name", run))
        candidates += [runs_dir / name, sweep_dir.parent.parent / runs_dir / name]
    candidates += [Path("runs") / run, sweep_dir / "runs" / run, sweep_dir.parent / run]
    for candidate in candidates:
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


read_metrics = read_metrics_rows  # eval's historical name


def record_from_run_dir(run_dir: Path) -> RunRecord:
    """A record for a bare run dir (no sweep CSV): counts from its config via ebt.flops, losses from metrics."""
    from ebt import ModelConfig
    from ebt.flops import parameter_count, train_flops_per_token

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a run directory written by `ebt train`)")
    import yaml

    data = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{config_path}: no model section")
    try:
        cfg = ModelConfig.from_dict(data["model"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"{config_path}: {str(error).splitlines()[0]}") from None
    rows = read_metrics(run_dir)
    final = next((r for r in reversed(rows) if r.get("final")), None)
    train = [r for r in rows if not r.get("final") and "loss" in r]
    last = final or (train[-1] if train else {})
    tokens = _float(last.get("tokens"))
    return RunRecord(
        run=str(data.get("name", run_dir.name)),
        kind=cfg.kind,
        size=cfg.size,
        n_params=float(parameter_count(cfg)),
        tokens=tokens,
        flops=tokens * float(train_flops_per_token(cfg)),
        train_loss=_float(train[-1].get("loss")) if train else math.nan,
        val_loss=_float(final.get("val_loss")) if final else math.nan,
        finished=final is not None,
        state="DONE" if final else "INCOMPLETE",
        seed=str((data.get("trainer") or {}).get("seed", "")),
        run_dir=run_dir,
        source=str(run_dir),
    )


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir())


def _eval_files(root: Path) -> list[Path]:
    found = []
    for path in sorted(root.rglob("eval*.json")):
        try:
            if json.loads(path.read_text()).get("schema") == EVAL_SCHEMA:
                found.append(path)
        except (json.JSONDecodeError, OSError, AttributeError):
            continue
    return found


def gather(paths: list[str | Path]) -> SweepInputs:
    """Records and eval JSONs from sweep dirs, results CSVs, run dirs or dirs of run dirs."""
    out = SweepInputs()
    eval_roots: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"no such sweep or run directory: {path}")
        if path.is_file():
            if path.suffix not in (".csv", ".parquet"):
                raise ValueError(f"{path}: expected a results .csv/.parquet, a sweep dir or a run dir")
            out.records += load_results_csv(path)
            eval_roots.append(path.parent)
        elif (path / RESULTS_NAME).is_file():
            out.records += load_results_csv(path / RESULTS_NAME)
            eval_roots.append(path)
        elif _is_run_dir(path):
            out.records.append(record_from_run_dir(path))
            eval_roots.append(path)
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and _is_run_dir(p))
            if not children:
                raise ValueError(
                    f"{path}: neither a sweep dir (no {RESULTS_NAME}; run `ebt sweep collect`) "
                    "nor a run dir (no metrics.jsonl)"
                )
            out.records += [record_from_run_dir(p) for p in children]
            eval_roots.append(path)
    eval_roots += [r.run_dir for r in out.records if r.run_dir is not None]
    seen: set[Path] = set()
    for root in eval_roots:
        for file in _eval_files(root):
            if file.resolve() not in seen:
                seen.add(file.resolve())
                out.eval_files.append(file)
    names = [r.run for r in out.records]
    for name in sorted({n for n in names if names.count(n) > 1}):
        out.warnings.append(f"run '{name}' appears {names.count(name)} times in the inputs; each copy is used")
    return out


def screen(records: list[RunRecord], loss_column: str) -> tuple[list[RunRecord], list[Exclusion]]:
    """Records usable for fits, and the others with the reason they were left out."""
    if loss_column not in LOSS_COLUMNS:
        raise ValueError(f"loss column must be one of {LOSS_COLUMNS}, got {loss_column!r}")
    kept, excluded = [], []
    for r in records:
        loss = r.loss(loss_column)
        if r.kind not in KINDS:
            excluded.append(Exclusion(r.run, f"unknown kind {r.kind!r} (expected one of {', '.join(KINDS)})"))
        elif not r.finished:
            excluded.append(Exclusion(r.run, f"unfinished (state {r.state or 'unknown'})"))
        elif not math.isfinite(loss):
            excluded.append(Exclusion(r.run, f"non-finite {loss_column} ({loss})"))
        elif not (math.isfinite(r.n_params) and r.n_params > 0):
            excluded.append(Exclusion(r.run, f"parameter count missing or invalid ({r.n_params})"))
        else:
            kept.append(r)
    for kind in KINDS:
        of_kind = [r for r in kept if r.kind == kind]
        if 0 < len(of_kind) < 3:
            for r in of_kind:
                excluded.append(Exclusion(r.run, f"only {len(of_kind)} usable {kind} run(s); a fit needs at least 3"))
            kept = [r for r in kept if r.kind != kind]
    return kept, excluded
