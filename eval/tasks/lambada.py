"""LAMBADA (the OpenAI version, EleutherAI/lambada_openai): predict a passage's last word.

As lm-evaluation-harness's lambada_openai: context = the text before its last space, target = " " + the last
word. Accuracy: greedy decoding would produce every token of the target (the argmax at each of its positions).
Perplexity: exp(-mean over examples of log p(target | context)), the harness's definition (per word, not per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from eval.tasks.base import Task, TaskResult, chunked_loglikelihood
from eval.tasks.data import HubSource, field


@dataclass
class LambadaExample:
    context: str
    word: str


class Lambada(Task):
    name = "lambada"
    hub = HubSource("EleutherAI/lambada_openai", "en", "test")
    description = "last-word accuracy (greedy) and perplexity of the last word"
    metric_names = ("acc", "ppl")

    def parse(self, where, row):
        text = field(row, "text", where)
        context, _, word = text.rpartition(" ")
        if not context.strip() or not word.strip():
            raise ValueError(f"{where}: field 'text' has no last word after a context: {text[:60]!r}")
        return LambadaExample(context, word)

    def evaluate(self, scorer, examples, advance, max_new_tokens: int | None = None):
        pairs = [(ex.context, " " + ex.word) for ex in examples]
        scores = chunked_loglikelihood(scorer, pairs, [1] * len(examples), advance)
        mean_ll = sum(ll for ll, _ in scores) / len(scores)
        metrics = {"acc": sum(greedy for _, greedy in scores) / len(scores), "ppl": math.exp(min(-mean_ll, 700.0))}
        samples = [{"target": ex.word, "logprob": ll, "greedy": greedy}
                   for ex, (ll, greedy) in zip(examples[:5], scores, strict=False)]
        return TaskResult(len(examples), metrics, samples=samples)
