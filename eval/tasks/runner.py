"""`ebt eval --task NAME`: one downstream task on a checkpoint, for each thinking setting; JSON for `ebt report`.

Everything that can be wrong with the inputs (the checkpoint, its tokenizer, every row of the data) is checked
before the first example is scored, and the JSON is written atomically at the end, so a refused or failed
evaluation leaves no file behind.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.tasks import get_task
from eval.tasks.data import load_hub, read_jsonl
from fsutil import atomic_write_text


@dataclass
class TaskSettings:
    steps: list[int] | None = None  # EBT thinking steps to evaluate; None: the trained mcmc_steps
    samples: list[int] = field(default_factory=lambda: [1])
    selections: list[str] = field(default_factory=lambda: ["min"])  # used for cells with several samples
    seed: int = 0
    batch_size: int = 8
    limit: int = 0  # the first N examples (0: all)
    max_new_tokens: int | None = None  # generation tasks; None: the task's default
    tokenizer: str | None = None
    device: str = "cpu"

    def validate(self) -> None:
        from ebt.inference import SELECTIONS

        if self.steps is not None and (not self.steps or min(self.steps) < 0):
            raise ValueError(f"--steps: need step counts >= 0, got {self.steps}")
        if not self.samples or min(self.samples) < 1:
            raise ValueError(f"--samples: need counts >= 1, got {self.samples}")
        for selection in self.selections:
            if selection not in SELECTIONS:
                raise ValueError(f"--selection: unknown selection {selection!r}; expected one of "
                                 f"{', '.join(SELECTIONS)}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ValueError(f"--limit: must be >= 0, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")


def thinking_cells(settings: TaskSettings, model_cfg) -> list[tuple[int | None, int, str]]:
    """(steps, samples, selection) to evaluate: one cell for a Transformer++; for an EBT every steps x samples,
    with every selection where there are several samples to select from."""
    if model_cfg.kind != "ebt":
        return [(None, 1, "none")]
    cells = []
    for steps in settings.steps or [model_cfg.thinking.eval_steps]:
        for samples in settings.samples:
            for selection in settings.selections if samples > 1 else ["none"]:
                cells.append((steps, samples, selection))
    return list(dict.fromkeys(cells))


def load_examples(task_name: str, data: str | None, limit: int = 0) -> list[Any]:
    """Every row parsed (a bad row is one error naming FILE:LINE and the field), then the first `limit`."""
    task = get_task(task_name)
    rows = read_jsonl(data) if data is not None else load_hub(task_name, task.hub)
    examples = [task.parse(where, row) for where, row in rows]
    return examples[:limit] if limit else examples


def run_task_eval(checkpoint: str | Path, task_name: str, data: str | None, settings: TaskSettings, *,
                  out_path: str | Path | None = None, progress: bool = True,
                  print_table: bool = True) -> dict[str, Any]:
    import torch

    from ebt.flops import parameter_count
    from eval.evaluate import EvalProgress, _run_name
    from eval.scoring import Scorer, Thinking, check_device
    from eval.sweep_data import EVAL_SCHEMA
    from launch.checkpoint import load_model, resolve_checkpoint
    from launch.run_dir import find_tokenizer

    task = get_task(task_name)
    settings.validate()
    check_device("--device", settings.device)
    torch.set_flush_denormal(True)
    path = resolve_checkpoint(checkpoint)
    model, model_cfg = load_model(path, device=settings.device)
    tokenizer = find_tokenizer(path, settings.tokenizer, model_vocab=model_cfg.architecture.vocab_size)
    examples = load_examples(task_name, data, settings.limit)
    if model_cfg.kind == "ebt" and model_cfg.thinking.init_logit_std == 0 and max(settings.samples) > 1:
        print("ebt eval: warning: the checkpoint's model.thinking.init_logit_std is 0, so every chain of a token "
              "starts from the same logits and follows the same descent: cells with several samples repeat the "
              "1-sample result",
              file=sys.stderr)
    cells = []
    with EvalProgress(enabled=progress) as bar:
        for steps, samples, selection in thinking_cells(settings, model_cfg):
            thinking = Thinking(steps, samples, "min" if selection == "none" else selection, settings.seed)
            scorer = Scorer(model, model_cfg, tokenizer, thinking, settings.batch_size)
            label = task_name if steps is None else f"{task_name} steps={scorer.steps} samples={samples}"
            progress_task = bar.start(label, len(examples), 1, unit="examples")
            result = task.evaluate(scorer, examples, lambda k, t=progress_task: bar.advance(t, k),
                                   settings.max_new_tokens)
            bar.finish(progress_task)
            cells.append({"steps": scorer.steps if model_cfg.kind == "ebt" else None, "samples": samples,
                          "selection": selection, "n": result.n, "skipped": result.skipped,
                          "metrics": result.metrics, "examples": result.samples})
    is_ebt = model_cfg.kind == "ebt"
    report = {
        "schema": EVAL_SCHEMA, "checkpoint": str(path), "run": _run_name(path), "kind": model_cfg.kind,
        "size": model_cfg.size, "n_params": parameter_count(model_cfg),
        "mcmc_steps": model_cfg.thinking.eval_steps if is_ebt else None, "settings": dataclasses.asdict(settings),
        "sources": [],
        "tasks": [{"task": task_name, "data": data or f"hf:{task.hub.describe()}", "description": task.description,
                   "metric_names": list(task.metric_names), "cells": cells}],
    }
    out = Path(out_path) if out_path else path / f"eval-{task_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1, allow_nan=True))
    if print_table:
        _print_table(report)
        print(f"wrote {out}")
    return report


def format_metric(name: str, value: float) -> str:
    return f"{value:.3f}" if name == "ppl" else f"{100 * value:.1f}%"


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    for task in report["tasks"]:
        cell = task["cells"][0]
        skipped = f", {cell['skipped']} skipped" if cell["skipped"] else ""
        table = Table("steps", "samples", "select", *task["metric_names"],
                      title=f"{report['run']} ({report['kind']}) on {task['task']}: {cell['n']} examples{skipped}")
        for cell in task["cells"]:
            table.add_row("-" if cell["steps"] is None else str(cell["steps"]), str(cell["samples"]),
                          cell["selection"], *(format_metric(m, cell["metrics"][m]) for m in task["metric_names"]))
        console.print(table)
