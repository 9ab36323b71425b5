"""GSM8K (openai/gsm8k, main): grade-school math word problems, answered by generation.

As lm-evaluation-harness's gsm8k, zero-shot: prompt "Question: <question>\\nAnswer:", greedy generation until
"Question:" or a blank line. exact_match: the final number of the generation (after "#### " if the model writes
one, else the last number in it: the harness's flexible-extract) equals the number after "####" in the gold
answer; exact_match_strict counts only generations that write "#### <number>" (strict-match). Numbers are
compared after removing commas, "$" and a trailing ".", with "72.0" read as "72".
"""

from __future__ import annotations

from dataclasses import dataclass

from eval.tasks.base import Task, TaskResult, generate_each
from eval.tasks.data import HubSource, field
from eval.tasks.metrics import gsm8k_prediction, gsm8k_target

UNTIL = ("Question:", "\n\n")


@dataclass
class Gsm8kExample:
    question: str
    target: str


class Gsm8k(Task):
    name = "gsm8k"
    hub = HubSource("openai/gsm8k", "main", "test")
    description = "exact match of the final number of a greedy generation"
    metric_names = ("exact_match", "exact_match_strict")
    max_new_tokens = 256

    def parse(self, where, row):
        question, answer = field(row, "question", where), field(row, "answer", where)
        try:
            return Gsm8kExample(question, gsm8k_target(answer))
        except ValueError as error:
            raise ValueError(f"{where}: field 'answer': {error}") from None

    def evaluate(self, scorer, examples, advance, max_new_tokens: int | None = None):
        prompts = [f"Question: {ex.question}\nAnswer:" for ex in examples]
        texts = generate_each(scorer, prompts, max_new_tokens or self.max_new_tokens, UNTIL, advance)
        flexible = [gsm8k_prediction(text) == ex.target for ex, text in zip(examples, texts, strict=True)]
        strict = [gsm8k_prediction(text, strict=True) == ex.target for ex, text in zip(examples, texts, strict=True)]
        n = len(examples)
        samples = [{"target": ex.target, "generated": text, "extracted": gsm8k_prediction(text)}
                   for ex, text in zip(examples[:5], texts, strict=False)]
        return TaskResult(n, {"exact_match": sum(flexible) / n, "exact_match_strict": sum(strict) / n},
                          samples=samples)
