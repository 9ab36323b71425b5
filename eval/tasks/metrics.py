"""Metric definitions of the downstream tasks, as their official scripts and lm-evaluation-harness define them."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------- SQuAD


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1/v2.0 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(gold)) for gold in golds)


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # the official script: both empty is a match, one empty is not
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer (the official max over golds)."""
    return max(_f1(prediction, gold) for gold in golds)


# ---------------------------------------------------------------------------------------------- GSM8K

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
# lm-evaluation-harness's gsm8k "flexible-extract": numbers with optional sign, $, commas and decimals.
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str | None:
    """'1,234.' -> '1234', '$5' -> '5', '72.0' -> '72'; None when no number is left."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(\.\d+)?", text):
        return None
    value = float(text)
    if math.isfinite(value) and value == int(value) and "." in text:
        return str(int(value))
    return text


def gsm8k_target(answer: str) -> str:
    """The gold final number: what follows '####' in a GSM8K answer."""
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    number = normalize_number(answer.split("####")[-1])
    if number is None:
        raise ValueError(f"answer's '####' line holds no number: {answer.split('####')[-1].strip()!r}")
    return number


def gsm8k_prediction(text: str, strict: bool = False) -> str | None:
    """The final number of a generated answer: after '#### ' if present (strict: only then), else the last
    number in the text (lm-evaluation-harness's strict-match and flexible-extract filters)."""
    found = _STRICT.findall(text)
    if found:
        return normalize_number(found[-1])
    if strict:
        return None
    for match in reversed(_NUMBER.findall(text)):
        number = normalize_number(next(group for group in match if group))
        if number is not None:
            return number
    return None
