"""AI2 ARC (allenai/ai2_arc, ARC-Easy and ARC-Challenge): multiple-choice science questions.

As lm-evaluation-harness's arc_easy/arc_challenge: context "Question: <question>\\nAnswer:", each choice scored
as the continuation " <choice text>". acc: the choice with the highest summed log-likelihood is the answer key;
acc_norm: the same with each log-likelihood divided by the choice's length in characters.
"""

from __future__ import annotations

from dataclasses import dataclass

from eval.tasks.base import Task, TaskResult, chunked_loglikelihood
from eval.tasks.data import HubSource, field


@dataclass
class ArcExample:
    question: str
    choices: list[str]
    gold: int


class Arc(Task):
    description = "multiple-choice accuracy by summed log-likelihood (acc) and per character (acc_norm)"
    metric_names = ("acc", "acc_norm")

    def __init__(self, name: str, config: str) -> None:
        self.name = name
        self.hub = HubSource("allenai/ai2_arc", config, "test")

    def parse(self, where, row):
        question = field(row, "question", where)
        choices = field(row, "choices", where, dict)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
            raise ValueError(f"{where}: field 'choices' must hold equally long lists 'text' and 'label' with at "
                             "least 2 choices")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{where}: every choice text must be a non-empty string")
        key = str(field(row, "answerKey", where, (str, int)))
        labels = [str(label) for label in labels]
        if key not in labels:
            raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        return ArcExample(question, texts, labels.index(key))

    def evaluate(self, scorer, examples, advance, max_new_tokens: int | None = None):
        pairs = [(f"Question: {ex.question}\nAnswer:", f" {choice}") for ex in examples for choice in ex.choices]
        scores = chunked_loglikelihood(scorer, pairs, [len(ex.choices) for ex in examples], advance)
        correct = correct_norm = 0
        samples = []
        start = 0
        for ex in examples:
            lls = [ll for ll, _ in scores[start:start + len(ex.choices)]]
            start += len(ex.choices)
            pick = max(range(len(lls)), key=lambda i: lls[i])
            pick_norm = max(range(len(lls)), key=lambda i: lls[i] / len(ex.choices[i]))
            correct += pick == ex.gold
            correct_norm += pick_norm == ex.gold
            if len(samples) < 5:
                samples.append({"gold": ex.choices[ex.gold], "predicted": ex.choices[pick], "loglikelihoods": lls})
        n = len(examples)
        return TaskResult(n, {"acc": correct / n, "acc_norm": correct_norm / n}, samples=samples)
