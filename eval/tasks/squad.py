"""SQuAD (rajpurkar/squad_v2; SQuAD v1.1 rows have the same fields): extractive reading comprehension.

Prompt as lm-evaluation-harness's squadv2: "Title: <title>\\n\\nBackground: <context>\\n\\nQuestion: <question>\\n\\n
Answer:", greedy generation until a newline. em and f1 are the official script's, maximised over the gold
answers. Questions without an answer (SQuAD v2's unanswerable ones) are left out, as the authors' loader does,
and counted as skipped. A context longer than the model's window is cut from the left (the question stays).
"""

from __future__ import annotations

from dataclasses import dataclass

from eval.tasks.base import Task, TaskResult, generate_each
from eval.tasks.data import HubSource, field
from eval.tasks.metrics import exact_match, f1_score

UNTIL = ("\n",)


@dataclass
class SquadExample:
    prompt: str
    golds: list[str]


class Squad(Task):
    name = "squad"
    hub = HubSource("rajpurkar/squad_v2", "squad_v2", "validation")
    description = "exact match and token F1 of a greedy generation against the gold answers"
    metric_names = ("em", "f1")
    max_new_tokens = 32

    def parse(self, where, row):
        context, question = field(row, "context", where), field(row, "question", where)
        answers = field(row, "answers", where, dict)
        texts = answers.get("text")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: field 'answers' must hold a list of strings 'text'")
        title = row.get("title")
        head = f"Title: {title}\n\n" if isinstance(title, str) and title else ""
        prompt = f"{head}Background: {context}\n\nQuestion: {question}\n\nAnswer:"
        return SquadExample(prompt, [t for t in texts if t.strip()])

    def evaluate(self, scorer, examples, advance, max_new_tokens: int | None = None):
        answerable = [ex for ex in examples if ex.golds]
        skipped = len(examples) - len(answerable)
        if not answerable:
            raise ValueError("every question is unanswerable (no gold answer): nothing to score")
        advance(skipped)
        texts = generate_each(scorer, [ex.prompt for ex in answerable], max_new_tokens or self.max_new_tokens, UNTIL,
                              advance)
        predictions = [text.strip() for text in texts]
        n = len(answerable)
        em = sum(exact_match(p, ex.golds) for p, ex in zip(predictions, answerable, strict=True)) / n
        f1 = sum(f1_score(p, ex.golds) for p, ex in zip(predictions, answerable, strict=True)) / n
        samples = [{"golds": ex.golds, "predicted": p} for ex, p in zip(answerable[:5], predictions, strict=False)]
        return TaskResult(n, {"em": em, "f1": f1}, skipped=skipped, samples=samples)
