"""`ebt generate`: the streaming hook of ebt.generate, the CLI on a run dir and an export (tokenizer found from the
checkpoint), both model kinds, and its bad inputs (one stderr line, exit 2)."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from ebt_factories import tiny_model
from scoring_support import trained_runs

from data_pipeline.tokenizer import load_meta, load_processor
from ebt.inference import generate
from launch.cli import main
from launch.run_dir import load_model, resolve_checkpoint


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_the_streaming_hook_sees_every_token_as_it_comes_and_changes_none(kind):
    model = tiny_model(kind=kind, context_length=12)  # init_logit_std 1: the EBT's starts use the generator
    prompt = torch.randint(0, 11, (2, 3))
    sampling = {"temperature": 1.0, "top_p": 0.9, "samples": 2} if kind == "ebt" else {"temperature": 1.0}
    plain = generate(model, prompt, 6, generator=torch.Generator().manual_seed(5), **sampling)
    seen: list[torch.Tensor] = []
    hooked = generate(model, prompt, 6, generator=torch.Generator().manual_seed(5),
                      on_token=lambda token: seen.append(token.clone()), **sampling)
    assert torch.equal(plain, hooked)
    assert torch.equal(torch.stack(seen, dim=1), plain[:, 3:])
    # Returning True stops at once, with the tokens so far (and the same ones).
    stopped = generate(model, prompt, 6, generator=torch.Generator().manual_seed(5),
                       on_token=lambda token: True, **sampling)
    assert torch.equal(stopped, plain[:, :4])


class Recorder(io.StringIO):
    """stdout that remembers each write, to see that text arrives piece by piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def expected_text(run, prompt: str, new: int, seed: int = 0, **kwargs) -> str:
    """What ebt.generate gives for the prompt after the end-of-document token, decoded."""
    path = resolve_checkpoint(run)
    model, cfg = load_model(path)
    tokenizer = str(run / "tokenizer")
    processor, eos = load_processor(tokenizer), load_meta(tokenizer).eos_id
    ids = [eos, *processor.encode(prompt)]
    steps = cfg.thinking.mcmc_steps if cfg.kind == "ebt" else None
    out = generate(model, torch.tensor([ids]), new, steps=steps, generator=torch.Generator().manual_seed(seed),
                   seed=seed, **kwargs)[0, len(ids):].tolist()
    if eos in out:
        out = out[:out.index(eos)]
    return processor.decode(out)


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_generate_streams_the_continuation_and_reports_tokens_per_second(kind, monkeypatch, capsys):
    run = trained_runs()[kind]
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    argv = ["generate", "--checkpoint", str(run), "--prompt", "def main(", "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    text = recorder.getvalue()
    assert text == "def main(" + expected_text(run, "def main(", 8, seed=3, temperature=1.0) + "\n"
    assert len(recorder.writes) >= 3  # the prompt, then the continuation in pieces, then the newline
    assert " tokens/s (" in err and err.count("\n") == 1
    assert ("2 thinking steps x 1 sample(s)" if kind == "ebt" else "Transformer++") in err


def test_an_export_carries_the_tokenizer_and_generates_the_same_text(tmp_path, capsys):
    run = trained_runs()["ebt"]
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert "and " + f"{out}/tokenizer/" in capsys.readouterr().out
    assert load_meta(str(out / "tokenizer")).model_sha256 == load_meta(str(run / "tokenizer")).model_sha256
    texts = []
    for checkpoint in (run, out):
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "import", "--max-new-tokens", "6",
                     "--steps", "3", "--samples", "2"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("import")


def test_the_run_dir_keeps_a_copy_of_its_tokenizer():
    from launch.config import load_saved_config
    from launch.run_dir import find_tokenizer

    run = trained_runs()["ebt"]
    cfg = load_saved_config(run / "config.yaml")
    from data_pipeline.api import tokenizer_dir
    from data_pipeline.sources import build_source

    cached = tokenizer_dir(cfg.data, build_source(cfg.data))
    assert load_meta(str(run / "tokenizer")).model_sha256 == load_meta(cached).model_sha256
    assert find_tokenizer(resolve_checkpoint(run)) == str(run / "tokenizer")


def one_line(capsys, code: int, *fragments: str) -> None:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebt generate: error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("kind", "extra", "fragments"),
    [
        ("ebt", ["--prompt", "x " * 40], ["--prompt", "leave no room", "model.architecture.context_length"]),
        ("ebt", ["--max-new-tokens", "100"], ["--max-new-tokens: 100 does not fit", "at most"]),
        ("ebt", ["--top-p", "0.9"], ["--top-p: only used when sampling"]),
        ("ebt", ["--temperature", "-1"], ["--temperature"]),
        ("transformer", ["--steps", "4"], ["--steps: a Transformer++ does not think"]),
        ("ebt", ["--tokenizer", "/nonexistent/tok"], ["--tokenizer /nonexistent/tok"]),
        ("ebt", ["--device", "gpu0"], ["--device 'gpu0': not a torch device"]),
    ],
)
def test_bad_generate_inputs_are_one_line(kind, extra, fragments, capsys):
    argv = ["generate", "--checkpoint", str(trained_runs()[kind]), "--prompt", "def", *extra]
    one_line(capsys, main(argv), *fragments)


def test_an_export_without_a_tokenizer_asks_for_one(tmp_path, capsys):
    run = trained_runs()["ebt"]
    bare = tmp_path / "bare"
    assert main(["export", str(run), str(bare)]) == 0
    capsys.readouterr()
    import shutil

    shutil.rmtree(bare / "tokenizer")
    one_line(capsys, main(["generate", "--checkpoint", str(bare), "--prompt", "def"]),
             "keeps no tokenizer", "pass --tokenizer DIR")
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "def", "--max-new-tokens", "2",
                 "--tokenizer", str(run / "tokenizer")]) == 0
