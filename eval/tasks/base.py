"""What every downstream task provides: its public dataset, how to read one row, and how to score a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from eval.tasks.data import HubSource

# Log-likelihood requests are scored this many examples at a time between progress updates.
CHUNK = 16


@dataclass
class TaskResult:
    n: int  # examples scored
    metrics: dict[str, float]  # fractions in [0, 1], except perplexities
    skipped: int = 0  # examples the task's definition leaves out (e.g. SQuAD v2's unanswerable questions)
    samples: list[dict[str, Any]] | None = None  # a few predictions next to their targets, for reading


class Task:
    name: str
    hub: HubSource
    description: str  # one line for --help and the report: the metric and how it is computed
    metric_names: tuple[str, ...]

    def parse(self, where: str, row: dict[str, Any]) -> Any:
        """One row in the dataset's public format; a ValueError names `where` and the field."""
        raise NotImplementedError

    def evaluate(self, scorer, examples: Sequence[Any], advance: Callable[[int], None],
                 max_new_tokens: int | None = None) -> TaskResult:
        """Score the examples; advance(k) after every k examples; max_new_tokens: generation budget (generation
        tasks only; None: the task's default)."""
        raise NotImplementedError


def chunked_loglikelihood(scorer, pairs: Sequence[tuple[str, str]], per_example: Sequence[int],
                          advance: Callable[[int], None]) -> list[tuple[float, bool]]:
    """scorer.loglikelihood over (context, continuation) texts, CHUNK examples at a time (per_example[i]: how
    many consecutive pairs belong to example i), calling advance(examples done) after each chunk."""
    out: list[tuple[float, bool]] = []
    start = 0
    for first in range(0, len(per_example), CHUNK):
        counts = per_example[first:first + CHUNK]
        stop = start + sum(counts)
        out += scorer.loglikelihood([scorer.encode_pair(c, x) for c, x in pairs[start:stop]])
        start = stop
        advance(len(counts))
    return out


def generate_each(scorer, prompts: Sequence[str], max_new_tokens: int, until: Sequence[str],
                  advance: Callable[[int], None]) -> list[str]:
    """Greedy continuation of each prompt up to the first `until` string. An EBT's starts are keyed by the
    prompt (Scorer.generate), so every answer is reproducible and independent of the other examples."""
    out = []
    for prompt in prompts:
        text, _ = scorer.generate(scorer.encode(prompt), max_new_tokens, until=until)
        out.append(text)
        advance(1)
    return out
