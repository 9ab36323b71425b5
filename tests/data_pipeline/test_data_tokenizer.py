import json
import os

import pytest
from data_support import VOCAB, tiny  # noqa: F401 - session fixture

from data_pipeline.sources import EmbeddedCorpus
from data_pipeline.tokenizer import load_meta, load_processor, train_tokenizer
from launch.cli import main


def test_round_trip_stdlib_sample_exactly(tiny):  # noqa: F811
    processor = load_processor(tiny.tokenizer)
    # Files the tokenizer never saw (past the tiny training budget), so unseen text must survive too.
    unseen = EmbeddedCorpus(max_bytes=2_000_000, include_docs=False)
    sample = list(unseen.documents())[-40:]
    assert sum(len(t) for t in sample) > 50_000
    for text in sample:
        assert processor.decode(processor.encode(text)) == text


@pytest.mark.parametrize("text", [
    "def f():\n\tif x:\n\t\treturn  1  \n\n\n    # four spaces\n",
    "  leading spaces and trailing   ",
    "\n\nstarts with newlines\r\nand CRLF\r\n",
    "unicode: ünïcødé ☃ 中文 🐍 \u00a0nbsp\u200bzero-width",
    "x" * 5000 + " " * 300 + "\t" * 7,
])
def test_round_trip_whitespace_and_unicode(tiny, text):  # noqa: F811
    processor = load_processor(tiny.tokenizer)
    ids = processor.encode(text)
    assert processor.decode(ids) == text
    assert 0 not in ids  # byte fallback: no <unk>


def test_indentation_is_compact(tiny):  # noqa: F811
    # Whitespace-only pieces: eight spaces of indentation must not cost eight tokens.
    processor = load_processor(tiny.tokenizer)
    assert len(processor.encode("        ")) <= 2


def test_metadata_describes_model_and_sources(tiny):  # noqa: F811
    meta = load_meta(tiny.tokenizer)
    processor = load_processor(tiny.tokenizer)
    assert meta.vocab_size == VOCAB == processor.get_piece_size()
    assert (meta.eos_id, meta.bos_id, meta.pad_id, meta.unk_id) == (
        processor.eos_id(), processor.bos_id(), processor.pad_id(), processor.unk_id())
    assert len({meta.eos_id, meta.bos_id, meta.pad_id, meta.unk_id}) == 4
    from data_support import tiny_corpus

    assert meta.sources_hash == tiny_corpus().fingerprint()
    with open(os.path.join(tiny.tokenizer, "tokenizer.json")) as handle:
        assert json.load(handle)["model_sha256"] == meta.model_sha256


def test_tampered_model_is_rejected(tmp_path, tiny):  # noqa: F811
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(tiny.tokenizer, copy)
    with open(copy / "tokenizer.model", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(ValueError, match="has hash"):
        load_meta(str(copy))


def test_cli_trains_with_vocab_and_sentence_cap(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    lines = [json.dumps({"body": f"def {rng.choice(words)}(x):\n    return {rng.choice(words)}(x) * {i}\n"})
             for i in range(300)]
    corpus.write_text("\n".join(lines))
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--source", str(corpus), "--text-field", "body", "--vocab-size", "400",
               "--max-sentences", "150", "--out", str(out)])
    assert rc == 0
    meta = load_meta(str(out))
    assert meta.vocab_size == 400 and meta.max_sentences == 150 and meta.sentences_used == 150
    assert json.loads(capsys.readouterr().out)["sha256"] == meta.model_sha256
    # Same inputs again: a no-op. Other settings into the same directory: refused unless --force.
    same = ["tokenizer", "train", "--source", str(corpus), "--text-field", "body", "--out", str(out),
            "--max-sentences", "150"]
    assert main([*same, "--vocab-size", "400"]) == 0 and load_meta(str(out)) == meta
    assert main([*same, "--vocab-size", "420"]) == 2
    assert "holds a tokenizer trained on other inputs or settings" in capsys.readouterr().err
    assert main([*same, "--vocab-size", "420", "--force"]) == 0 and load_meta(str(out)).vocab_size == 420


def test_too_small_vocab_and_empty_source_are_one_line_errors(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello")
    assert main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "100",
                 "--out", str(tmp_path / "t")]) == 2
    assert "vocab size 100 is too small" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(ValueError, match="yielded no text"):
        from data_pipeline.sources import LocalFiles

        train_tokenizer(LocalFiles(str(empty)), str(tmp_path / "t2"))
    assert not (tmp_path / "t2").exists()
