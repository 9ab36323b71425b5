"""The lm-evaluation-harness adapter through the harness's own evaluator: three local tasks (multiple choice,
rolling log-likelihood, generation) defined as YAML files under a TaskManager include path, over local jsonl
files (no hub), for an EBT at given thinking steps and for a Transformer++. Every response the harness records
is checked against eval.scoring.Scorer, which `ebt eval --task` uses too."""

from __future__ import annotations

import json
import math
import re

import lm_eval
import pytest
from lm_eval.tasks import TaskManager
from scoring_support import trained_runs

import eval.lm_eval_adapter  # noqa: F401 - registers the "ebt" model type
from eval.lm_eval_adapter import EBTHarnessLM
from eval.scoring import Scorer, Thinking

MC = [{"question": "Which keyword defines a function?", "choices": ["def", "class", "import"], "gold": 0},
      {"question": "Which keyword imports a module?", "choices": ["def", "import"], "gold": 1},
      {"question": "Which value is false?", "choices": ["True", "None", "1"], "gold": 1}]
DOCS = [{"text": "import os\nimport sys\n\ndef main():\n    return os.getcwd()\n" * 2}, {"text": "x = 1\ny = x + 1\n"}]
GEN = [{"prompt": "x = 1\ny =", "answer": " 2"}, {"prompt": "import", "answer": " os"}]

YAML = {
    "ebt_tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "ebt_tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
    "ebt_tiny_gen": """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("ebt_tiny_mc", MC), ("ebt_tiny_rolling", DOCS), ("ebt_tiny_gen", GEN)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {data}\ntest_split: test\n{YAML[name]}")
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def evaluate(task_dir, model_args: str) -> dict:
    return lm_eval.simple_evaluate(model="ebt", model_args=model_args, tasks=list(YAML),
                                   task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0,
                                   log_samples=True, device="cpu")


@pytest.mark.parametrize(("kind", "args", "thinking"),
                         [("ebt", ",steps=3,samples=2,seed=5", Thinking(steps=3, samples=2, seed=5)),
                          ("transformer", "", Thinking())])
def test_the_harness_evaluates_a_checkpoint_with_the_scorer_s_numbers(task_dir, kind, args, thinking):
    run = trained_runs()[kind]
    results = evaluate(task_dir, f"checkpoint={run}{args}")
    scorer = Scorer.load(run, thinking=thinking)
    samples = results["samples"]

    # Multiple choice: every choice's (log-likelihood, is-greedy) is the scorer's, and acc follows from them.
    correct = 0
    for sample in sorted(samples["ebt_tiny_mc"], key=lambda s: s["doc_id"]):
        doc = MC[sample["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        expected = scorer.loglikelihood([scorer.encode_pair(context, f" {c}") for c in doc["choices"]])
        got = [tuple(resp[0]) for resp in sample["resps"]]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=1e-6)
        lls = [ll for ll, _ in expected]
        correct += lls.index(max(lls)) == doc["gold"]
    assert results["results"]["ebt_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    # Rolling: the document log-likelihoods, and the bits per UTF-8 byte over them.
    lls = {s["doc_id"]: s["resps"][0][0] for s in samples["ebt_tiny_rolling"]}
    for doc_id, doc in enumerate(DOCS):
        assert lls[doc_id] == pytest.approx(scorer.rolling_loglikelihood(scorer.encode(doc["text"])), rel=1e-6)
    size = sum(len(doc["text"].encode()) for doc in DOCS)
    assert results["results"]["ebt_tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
        -sum(lls.values()) / size / math.log(2), rel=1e-6)

    # Generation: greedy, cut at the first newline, as the scorer generates it.
    for sample in samples["ebt_tiny_gen"]:
        doc = GEN[sample["doc_id"]]
        expected, _ = scorer.generate(scorer.encode(doc["prompt"]), 4, until=["\n"])
        assert sample["resps"][0][0] == expected and "\n" not in expected


def test_thinking_steps_are_a_model_argument(task_dir):
    run = trained_runs()["ebt"]
    pairs = [("Question: Which value is false?\nAnswer:", " None")]

    class Request:  # what the harness hands a model: an object with .args
        def __init__(self, args):
            self.args = args

    by_steps = {}
    for steps in (0, 3):
        lm = EBTHarnessLM.create_from_arg_string(f"checkpoint={run},steps={steps}", {"device": "cpu"})
        assert lm.scorer.steps == steps
        by_steps[steps] = lm.loglikelihood([Request(p) for p in pairs])[0][0]
        scorer = Scorer.load(run, thinking=Thinking(steps=steps))
        assert by_steps[steps] == pytest.approx(scorer.loglikelihood([scorer.encode_pair(*pairs[0])])[0][0])
    assert by_steps[0] != pytest.approx(by_steps[3])
    # The default is the trained number of steps.
    assert EBTHarnessLM.create_from_arg_string(f"checkpoint={run}").scorer.steps == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [("steps=2", "model_args checkpoint: required"), ("checkpoint={run},steps=-1", "model_args steps: must be"),
     ("checkpoint={run},sample=2", "model_args sample: unknown argument"),
     ("checkpoint={run},selection=best", "selection: unknown selection 'best'"),
     ("checkpoint=/nonexistent", "no such checkpoint or run directory")],
)
def test_bad_model_args_name_the_argument(args, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        EBTHarnessLM.create_from_arg_string(args.format(run=trained_runs()["ebt"]))


# The tiny EBT's thinking makes its log-likelihoods so extreme that the per-word perplexity overflows the harness's
# math.exp; 0 steps still scores through the EBT path (prefix-keyed starts), with moderate values.
@pytest.mark.parametrize(("kind", "steps"), [("ebt", 0), ("transformer", None)])
def test_the_shipped_sample_tasks_give_what_ebt_eval_task_gives(monkeypatch, tmp_path, kind, steps):
    """eval/tasks/samples/lm_eval holds the harness's own arc_easy and lambada_openai definitions over the sample
    files; through the harness they must reproduce `ebt eval --task` on the same files (the task code is ours
    there, the harness's here)."""
    from pathlib import Path

    from eval.tasks.runner import TaskSettings, run_task_eval

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the YAML files name their data relative to the repository root
    run = trained_runs()[kind]
    model_args = f"checkpoint={run}" + (f",steps={steps}" if steps is not None else "")
    results = lm_eval.simple_evaluate(model="ebt", model_args=model_args,
                                      tasks=["ebt_sample_arc", "ebt_sample_lambada"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(repo / "eval/tasks/samples/lm_eval")),
                                      device="cpu")["results"]
    ours = {}
    settings = TaskSettings(steps=None if steps is None else [steps])
    for task, data in (("arc_easy", "arc"), ("lambada", "lambada")):
        report = run_task_eval(run, task, f"eval/tasks/samples/{data}.jsonl", settings,
                               out_path=tmp_path / f"{task}.json", progress=False, print_table=False)
        ours[task] = report["tasks"][0]["cells"][0]["metrics"]
    assert results["ebt_sample_arc"]["acc,none"] == pytest.approx(ours["arc_easy"]["acc"])
    assert results["ebt_sample_arc"]["acc_norm,none"] == pytest.approx(ours["arc_easy"]["acc_norm"])
    assert results["ebt_sample_lambada"]["acc,none"] == pytest.approx(ours["lambada"]["acc"])
    assert math.log(results["ebt_sample_lambada"]["perplexity,none"]) == pytest.approx(
        math.log(ours["lambada"]["ppl"]), rel=1e-6)
