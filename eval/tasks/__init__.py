"""Downstream tasks of `ebt eval --task`: LAMBADA, ARC-Easy/Challenge, GSM8K and SQuAD, scored through
eval.scoring.Scorer (the same scoring as the lm-evaluation-harness adapter)."""

from __future__ import annotations

from eval.tasks.arc import Arc
from eval.tasks.base import Task, TaskResult
from eval.tasks.gsm8k import Gsm8k
from eval.tasks.lambada import Lambada
from eval.tasks.squad import Squad

TASKS: dict[str, Task] = {
    "lambada": Lambada(),
    "arc_easy": Arc("arc_easy", "ARC-Easy"),
    "arc_challenge": Arc("arc_challenge", "ARC-Challenge"),
    "gsm8k": Gsm8k(),
    "squad": Squad(),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"--task: unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "TaskResult", "get_task"]
