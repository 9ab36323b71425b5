"""Downstream tasks (`ebt eval --task`): each task's metric on hand-made fixtures with known answers, the scorer's
log-likelihoods for both kinds, the CLI end to end into the eval JSON and `ebt report`, and bad inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from scoring_support import trained_runs

from eval.report import build_report
from eval.scoring import Scorer, Thinking, prefix_keyed_starts
from eval.tasks import TASKS
from eval.tasks.metrics import exact_match, f1_score, gsm8k_prediction, gsm8k_target, normalize_answer
from launch.cli import main

# ---------------------------------------------------------------------------------------------- metrics


def test_squad_metrics_are_the_official_ones():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # prediction "eiffel" vs gold "eiffel tower": precision 1, recall 1/2 -> F1 2/3; the best gold counts.
    assert f1_score("Eiffel", ["Eiffel Tower", "Rome"]) == pytest.approx(2 / 3)
    assert f1_score("", ["Eiffel Tower"]) == 0.0


@pytest.mark.parametrize(
    ("text", "flexible", "strict"),
    [("3 + 4 = 7\n#### 7", "7", "7"), ("so she has $1,200.", "1200", None), ("72.0 apples", "72", None),
     ("#### -3 and then 5", "-3", "-3"), ("no number here", None, None)],
)
def test_gsm8k_final_number_extraction(text, flexible, strict):
    assert gsm8k_prediction(text) == flexible
    assert gsm8k_prediction(text, strict=True) == strict


def test_gsm8k_target_is_the_number_after_the_hashes():
    assert gsm8k_target("Natalia sold 48/2 = 24 clips.\n#### 1,024") == "1024"
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        gsm8k_target("just 5")


# ---------------------------------------------------------------------------------------------- tasks


class FakeScorer:
    """Known log-likelihoods and generations, so each task's metric arithmetic is checked exactly."""

    thinking = Thinking()

    def __init__(self, loglikelihoods: dict | None = None, generations: dict | None = None) -> None:
        self.loglikelihoods, self.generations = loglikelihoods or {}, generations or {}

    def encode_pair(self, context, continuation):
        return context, continuation

    def encode(self, text):
        return text

    def loglikelihood(self, pairs):
        return [self.loglikelihoods[pair] for pair in pairs]

    def generate(self, prompt, max_new_tokens, until=()):
        return self.generations[prompt], 1


def parse(task_name: str, rows: list[dict]) -> list:
    return [TASKS[task_name].parse(f"row{i}", row) for i, row in enumerate(rows)]


def test_lambada_accuracy_is_greedy_and_perplexity_is_per_word():
    examples = parse("lambada", [{"text": "the cat sat on the mat"}, {"text": "import os"}])
    fake = FakeScorer({("the cat sat on the", " mat"): (-1.0, True), ("import", " os"): (-3.0, False)})
    result = TASKS["lambada"].evaluate(fake, examples, lambda k: None)
    assert result.metrics == {"acc": 0.5, "ppl": pytest.approx(math.exp(2.0))}


def test_arc_accuracy_by_summed_and_by_per_character_log_likelihood():
    row = {"question": "Q?", "choices": {"text": ["a", "bbbb"], "label": ["A", "B"]}, "answerKey": "B"}
    other = {"question": "R?", "choices": {"text": ["yes", "no"], "label": ["1", "2"]}, "answerKey": "1"}
    examples = parse("arc_easy", [row, other])
    context, second = "Question: Q?\nAnswer:", "Question: R?\nAnswer:"
    # Q: summed, "a" wins (-2 > -4); per character, "bbbb" (-1 > -2), the key. R: "yes" both ways, the key.
    fake = FakeScorer({(context, " a"): (-2.0, False), (context, " bbbb"): (-4.0, False),
                       (second, " yes"): (-1.0, True), (second, " no"): (-3.0, False)})
    result = TASKS["arc_easy"].evaluate(fake, examples, lambda k: None)
    assert result.metrics == {"acc": 0.5, "acc_norm": 1.0} and result.n == 2
    assert result.samples[0]["predicted"] == "a" and result.samples[0]["gold"] == "bbbb"


def test_gsm8k_exact_match_of_the_final_number():
    rows = [{"question": f"q{i}", "answer": "work\n#### 7"} for i in range(3)]
    prompts = [f"Question: q{i}\nAnswer:" for i in range(3)]
    fake = FakeScorer(generations={prompts[0]: " 3+4=7\n#### 7", prompts[1]: " it is 7.", prompts[2]: " 8"})
    result = TASKS["gsm8k"].evaluate(fake, parse("gsm8k", rows), lambda k: None)
    assert result.metrics == {"exact_match": pytest.approx(2 / 3), "exact_match_strict": pytest.approx(1 / 3)}


def test_squad_em_f1_and_unanswerable_questions_skipped():
    rows = [{"title": "T", "context": "C1", "question": "Who?", "answers": {"text": ["Guido van Rossum"]}},
            {"context": "C2", "question": "What?", "answers": {"text": ["the Eiffel Tower"]}},
            {"context": "C3", "question": "Why?", "answers": {"text": [], "answer_start": []}}]
    examples = parse("squad", rows)
    assert examples[0].prompt == "Title: T\n\nBackground: C1\n\nQuestion: Who?\n\nAnswer:"
    fake = FakeScorer(generations={examples[0].prompt: " Guido van Rossum", examples[1].prompt: " Eiffel"})
    result = TASKS["squad"].evaluate(fake, examples, lambda k: None)
    assert result.n == 2 and result.skipped == 1
    assert result.metrics == {"em": 0.5, "f1": pytest.approx((1 + 2 / 3) / 2)}


# ---------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def scorers():
    runs = trained_runs()
    return {kind: Scorer.load(run, batch_size=3) for kind, run in runs.items()}


def test_ebt_log_likelihood_is_the_log_softmax_of_the_final_thinking_logits(scorers):
    scorer = scorers["ebt"]
    context, continuation = scorer.encode_pair("def main(", "self):")
    tokens = [scorer.eos_id, *context, *continuation]
    inputs = torch.tensor([tokens[:-1]])
    cfg = scorer.cfg
    assert cfg.thinking.init_logit_std > 0  # the starts matter
    for steps, samples in ((0, 1), (3, 2)):
        thinking = Thinking(steps=steps, samples=samples, seed=4)
        starts = prefix_keyed_starts(inputs, 4, samples, cfg.architecture.vocab_size, cfg.thinking.init_logit_std)
        logits = scorer.model.think(inputs, steps, samples, "min", starts=starts).logits[0]
        logprobs = torch.log_softmax(logits.double(), -1)
        n = len(continuation)
        expected = sum(float(logprobs[len(tokens) - 2 - n + 1 + i, continuation[i]]) for i in range(n))
        got, _ = Scorer(scorer.model, cfg, scorer.tokenizer_dir, thinking).loglikelihood([(context, continuation)])[0]
        assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_a_prediction_depends_on_its_prefix_only(scorers, kind):
    """Chain rule: log p(a b | c) = log p(a | c) + log p(b | c a), which holds only if the prediction at each
    position is a function of the tokens before it (for an EBT, its starts are keyed by that prefix)."""
    scorer = scorers[kind]
    c, a, b = scorer.encode("import os\n"), scorer.encode("def"), scorer.encode(" main():")
    whole, first, second = scorer.loglikelihood([(c, a + b), (c, a), (c + a, b)])
    assert whole[0] == pytest.approx(first[0] + second[0], abs=1e-6)
    assert whole[1] == (first[1] and second[1])


def test_scores_do_not_depend_on_batching(scorers):
    scorer = scorers["ebt"]
    pairs = [scorer.encode_pair(f"x = {i}", " + 1") for i in range(5)] + [scorer.encode_pair("import", " sys")]
    one = Scorer(scorer.model, scorer.cfg, scorer.tokenizer_dir, batch_size=1).loglikelihood(pairs)
    batched = scorer.loglikelihood(pairs)  # 3 per batch, the shorter rows padded
    # Equal up to float32 rounding (other matmul shapes), with the same greedy verdicts.
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in one], rel=1e-6)
    assert [greedy for _, greedy in batched] == [greedy for _, greedy in one]


def test_rolling_log_likelihood_predicts_every_token_exactly_once(scorers, monkeypatch):
    scorer = scorers["transformer"]
    vocab = scorer.cfg.architecture.vocab_size
    # Uniform logits: each predicted token adds exactly -log V, so the sum counts the predictions.
    monkeypatch.setattr(scorer.model, "logits", lambda tokens, past=None: (torch.zeros(*tokens.shape, vocab), None))
    ids = scorer.encode("def f(x):\n    return x + 1\n" * 6)
    assert len(ids) > 2 * scorer.context_length
    assert scorer.rolling_loglikelihood(ids) == pytest.approx(-len(ids) * math.log(vocab))


# ---------------------------------------------------------------------------------------------- CLI


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


FIXTURES = {
    "lambada": [{"text": "import os\nimport sys\nimport"}, {"text": "def main(self): return self"}],
    "arc_easy": [{"id": "1", "question": "Which keyword defines a function?",
                  "choices": {"text": ["def", "class", "import"], "label": ["A", "B", "C"]}, "answerKey": "A"}],
    "arc_challenge": [{"id": "2", "question": "What does len return?",
                       "choices": {"text": ["a length", "a string"], "label": ["1", "2"]}, "answerKey": "1"}],
    "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}],
    "squad": [{"id": "a", "title": "Python", "context": "Python was created by Guido.", "question": "Who?",
               "answers": {"text": ["Guido"], "answer_start": [22]}}],
}


@pytest.mark.parametrize("task", list(FIXTURES))
def test_every_task_through_the_cli_into_the_eval_json(task, tmp_path, capsys):
    run = trained_runs()["ebt"]
    data = write_jsonl(tmp_path / f"{task}.jsonl", FIXTURES[task])
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(run), "--task", task, "--data", str(data), "--steps", "1,2",
            "--samples", "1,2", "--out", str(out), "--no-progress", "--max-new-tokens", "4"]
    if task in ("lambada", "arc_easy", "arc_challenge"):
        argv = argv[:-2]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (entry,) = report["tasks"]
    assert report["schema"] == "ebt-eval/1" and report["kind"] == "ebt" and entry["task"] == task
    cells = {(c["steps"], c["samples"]): c for c in entry["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for cell in cells.values():
        assert cell["n"] == len(FIXTURES[task]) and set(cell["metrics"]) == set(TASKS[task].metric_names)
        assert all(0 <= v <= 1 for k, v in cell["metrics"].items() if k != "ppl")
    if task == "lambada":  # the per-word perplexity and the log-likelihoods behind it agree
        cell = cells[(1, 1)]
        lls = [s["logprob"] for s in cell["examples"]]
        assert math.log(cell["metrics"]["ppl"]) == pytest.approx(min(-sum(lls) / len(lls), 700.0))


def test_transformer_task_eval_and_the_report_table(tmp_path, capsys):
    runs = trained_runs()
    data = write_jsonl(tmp_path / "arc.jsonl", FIXTURES["arc_easy"] * 3)
    for kind, run in runs.items():
        out = tmp_path / "runs" / run.name / "eval-arc_easy.json"
        out.parent.mkdir(parents=True)
        assert main(["eval", "--checkpoint", str(run), "--task", "arc_easy", "--data", str(data), "--out", str(out),
                     "--no-progress", "--limit", "2"]) == 0
        cells = json.loads(out.read_text())["tasks"][0]["cells"]
        assert len(cells) == 1 and cells[0]["n"] == 2
        assert (cells[0]["steps"] is None) == (kind == "transformer")
        (tmp_path / "runs" / run.name / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
        (tmp_path / "runs" / run.name / "config.yaml").write_text((run / "config.yaml").read_text())
    capsys.readouterr()
    build_report([tmp_path / "runs"], tmp_path / "report", n_boot=0, progress=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream tasks" in md
    assert "| tiny-transformer | transformer | arc_easy | - | 1 | none | 2 | acc " in md
    assert "| tiny-ebt | ebt | arc_easy | 2 | 1 | none | 2 | acc " in md
    fits = json.loads((tmp_path / "report" / "fits.json").read_text())
    assert {d["task"] for d in fits["downstream"]} == {"arc_easy"}


# ---------------------------------------------------------------------------------------------- bad inputs


def files_under(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize(
    ("task", "content", "extra", "fragments"),
    [
        ("arc_easy", '{"question": "Q", "answerKey": "A"}\n', [], [":1: missing field 'choices'"]),
        ("squad", '{"context": "c", "question": "q", "answers": {"text": ["a"]}}\n{oops\n', [],
         [":2: not valid JSON"]),
        ("gsm8k", '{"question": "q", "answer": "no hashes"}\n', [], [":1: field 'answer'", "####"]),
        ("lambada", "\n\n", [], ["holds no examples"]),
        ("arc_easy", '{"question": "Q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}\n',
         [], ["answerKey 'C' is not one of the labels"]),
        ("lambada", '{"text": "a b"}\n', ["--ood", "x"], ["--ood: not used with --task"]),
        ("lambada", '{"text": "a b"}\n', ["--limit", "-1"], ["--limit: must be >= 0"]),
        ("bogus", '{"text": "a b"}\n', [], ["--task: unknown task 'bogus'"]),
        ("lambada", '{"text": "a b"}\n', ["--device", "gpu0"], ["--device 'gpu0': not a torch device"]),
    ],
)
def test_bad_task_inputs_are_one_line_and_leave_nothing(task, content, extra, fragments, tmp_path, capsys):
    run = trained_runs()["ebt"]
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    before_run, before_tmp = files_under(run), files_under(tmp_path)
    argv = ["eval", "--checkpoint", str(run), "--task", task, "--data", str(data), "--no-progress",
            "--out", str(tmp_path / "out.json"), *extra]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebt eval: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert files_under(run) == before_run and files_under(tmp_path) == before_tmp


def test_without_data_the_hub_is_tried_and_its_failure_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the offline hub has nothing
    assert main(["eval", "--checkpoint", str(trained_runs()["ebt"]), "--task", "arc_challenge", "--no-progress",
                 "--out", str(tmp_path / "out.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot load allenai/ai2_arc (ARC-Challenge), split test from the Hugging Face hub" \
        in lines[0] and "pass --data FILE.jsonl" in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_an_unreachable_hub_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    import eval.tasks.data as task_data

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(task_data, "_resolves", lambda host: False)
    assert main(["eval", "--checkpoint", str(trained_runs()["ebt"]), "--task", "gsm8k", "--no-progress",
                 "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the Hugging Face hub (huggingface.co) is not reachable" in err
    assert not (tmp_path / "out.json").exists()


def test_the_hub_dataset_is_read_in_its_public_format(tmp_path, capsys, monkeypatch):
    """The hub path with `datasets.load_dataset` standing in for the hub: the task's id, config and split are
    asked for and its rows parsed like a local file's."""
    import datasets

    import eval.tasks.data as task_data

    asked = []

    def fake_load_dataset(path, name=None, split=None):
        asked.append((path, name, split))
        return FIXTURES["lambada"]

    monkeypatch.setattr(task_data, "_resolves", lambda host: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "out.json"
    assert main(["eval", "--checkpoint", str(trained_runs()["transformer"]), "--task", "lambada", "--no-progress",
                 "--out", str(out)]) == 0
    assert asked == [("EleutherAI/lambada_openai", "en", "test")]
    entry = json.loads(out.read_text())["tasks"][0]
    assert entry["data"] == "hf:EleutherAI/lambada_openai (en), split test" and entry["cells"][0]["n"] == 2
