import json
import os

import numpy as np
import pytest
from data_support import listing, tiny, tiny_corpus  # noqa: F401 - session fixture

from data_pipeline import prepare as prepare_mod
from data_pipeline.prepare import prepare_shards, read_manifest, shard_dtype
from data_pipeline.sources import LocalFiles, document_is_val
from data_pipeline.tokenizer import load_meta, load_processor
from launch.cli import main


def _docs_in(shards_dir, split, eos):
    manifest = read_manifest(shards_dir)
    tokens = np.concatenate([np.load(os.path.join(shards_dir, s["file"]))
                             for s in manifest["splits"][split]["shards"]])
    ends = np.flatnonzero(tokens == eos)
    assert ends[-1] == len(tokens) - 1  # every document, the last included, ends with EOS
    return [tuple(d[:-1].tolist()) for d in np.split(tokens, ends + 1)[:-1]], tokens


def test_shards_hold_every_document_once_in_shuffled_order(tiny):  # noqa: F811
    meta = load_meta(tiny.tokenizer)
    manifest = read_manifest(tiny.shards_dir)
    processor = load_processor(tiny.tokenizer)
    docs = list(tiny_corpus().documents())
    expected = {"train": [], "val": []}
    for text in docs:
        expected["val" if document_is_val(text, 0.25) else "train"].append(tuple(processor.encode(text)))
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        got, tokens = _docs_in(tiny.shards_dir, split, meta.eos_id)
        assert tokens.dtype == np.uint16 and manifest["dtype"] == "uint16"
        assert sorted(got) == sorted(expected[split])
        info = manifest["splits"][split]
        assert info["documents"] == len(expected[split]) and info["tokens"] == len(tokens)
        assert sum(s["tokens"] for s in info["shards"]) == len(tokens)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_tokens=30k forces several files
    got_train, _ = _docs_in(tiny.shards_dir, "train", meta.eos_id)
    assert got_train != expected["train"]  # shuffled, not source order
    assert manifest["tokenizer"]["sha256"] == meta.model_sha256
    assert manifest["sources"]["kind"] == "embedded" and manifest["val_fraction"] == 0.25


def test_rerun_is_noop_and_process_count_does_not_change_bytes(tmp_path, tiny):  # noqa: F811
    first = os.path.join(tmp_path, "p1")
    m1 = prepare_shards(tiny_corpus(), tiny.tokenizer, first, val_fraction=0.25, num_proc=1, shard_tokens=50_000,
                        progress=False)
    stamp = {f: os.stat(os.path.join(first, f)).st_mtime_ns for f in os.listdir(first)}
    again = prepare_shards(tiny_corpus(), tiny.tokenizer, first, val_fraction=0.25, num_proc=1,
                           shard_tokens=50_000, progress=False)
    assert again == m1
    assert stamp == {f: os.stat(os.path.join(first, f)).st_mtime_ns for f in os.listdir(first)}
    second = os.path.join(tmp_path, "p2")
    prepare_shards(tiny_corpus(), tiny.tokenizer, second, val_fraction=0.25, num_proc=2, shard_tokens=50_000,
                   progress=False)
    for name in os.listdir(first):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(os.path.join(first, name)), np.load(os.path.join(second, name)))
    other_seed = os.path.join(tmp_path, "p3")
    prepare_shards(tiny_corpus(), tiny.tokenizer, other_seed, val_fraction=0.25, seed=1, num_proc=1,
                   shard_tokens=50_000, progress=False)
    a, b = (np.load(os.path.join(d, "train_00000.npy")) for d in (first, other_seed))
    assert not np.array_equal(a, b)


def test_interrupted_run_leaves_no_manifest_and_restarts(tmp_path, tiny, monkeypatch):  # noqa: F811
    out = os.path.join(tmp_path, "shards")
    real = prepare_mod._write_split

    def crash_after_first_split(work, split, *args, **kwargs):
        if split == "val":
            raise KeyboardInterrupt  # e.g. Ctrl-C while the second split is being written
        return real(work, split, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_split", crash_after_first_split)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.25, num_proc=1, progress=False)
    assert listing(tmp_path) == []  # no shard dir, no partial dir, no manifest, no lock
    monkeypatch.setattr(prepare_mod, "_write_split", real)
    manifest = prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.25, num_proc=1, progress=False)
    assert read_manifest(out) == manifest


def test_stale_partial_dir_is_discarded(tmp_path, tiny):  # noqa: F811
    out = os.path.join(tmp_path, "shards")
    os.makedirs(os.path.join(tmp_path, ".shards.partial"))
    with open(os.path.join(tmp_path, ".shards.partial", "train_00000.npy"), "w") as handle:
        handle.write("garbage from a killed run")
    prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.25, num_proc=1, progress=False)
    assert not os.path.exists(os.path.join(tmp_path, ".shards.partial"))
    assert read_manifest(out) is not None


def test_other_inputs_in_out_dir_need_force(tmp_path, tiny):  # noqa: F811
    out = os.path.join(tmp_path, "shards")
    prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.25, num_proc=1, progress=False)
    with pytest.raises(ValueError, match="holds shards of other inputs"):
        prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.3, num_proc=1, progress=False)
    manifest = prepare_shards(tiny_corpus(), tiny.tokenizer, out, val_fraction=0.3, num_proc=1, force=True,
                              progress=False)
    assert read_manifest(out)["val_fraction"] == 0.3 == manifest["val_fraction"]


def test_empty_corpus_after_filters_is_an_error_and_writes_nothing(tmp_path, tiny):  # noqa: F811
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"text": "  \n "}) + "\n" + json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="empty after filtering"):
        prepare_shards(LocalFiles(str(path)), tiny.tokenizer, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_bad_jsonl_line_aborts_without_output(tmp_path, tiny, capsys):  # noqa: F811
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    rc = main(["data", "prepare", "--source", str(path), "--tokenizer", tiny.tokenizer, "--out",
               str(tmp_path / "out"), "--num-proc", "1", "--no-progress"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"ebt data: error: {path}:2: no 'text' field"
    assert not (tmp_path / "out").exists()


def test_dtype_choice_and_vocab_overflow():
    assert shard_dtype(4096) == np.uint16 and shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32 and shard_dtype(65537, "uint32") == np.uint32
    with pytest.raises(ValueError, match="vocab size 70000 does not fit shard dtype uint16"):
        shard_dtype(70000, "uint16")


def test_cli_prepare_reports_counts(tmp_path, tiny, capsys):  # noqa: F811
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}():\n    return {i}\n"}) + "\n" for i in range(50)))
    rc = main(["data", "prepare", "--source", str(path), "--tokenizer", tiny.tokenizer, "--out",
               str(tmp_path / "out"), "--val-fraction", "0", "--num-proc", "2", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["documents"] == 50 and report["splits"]["val"]["documents"] == 0
    assert report["dtype"] == "uint16"


def _prepare_in_child(tokenizer, out, queue):
    manifest = prepare_shards(tiny_corpus(), tokenizer, out, val_fraction=0.25, num_proc=1, progress=False)
    queue.put(manifest["key"])


def test_concurrent_prepares_wait_for_each_other(tmp_path, tiny):  # noqa: F811
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    out = str(tmp_path / "shards")
    children = [ctx.Process(target=_prepare_in_child, args=(tiny.tokenizer, out, queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0]
    keys = {queue.get(timeout=5) for _ in children}
    assert keys == {read_manifest(out)["key"]}
    assert listing(tmp_path) == sorted(f"shards/{f}" for f in os.listdir(out))  # the lock is gone too


def test_cli_prepares_a_training_configs_data_section(tmp_path, tiny, capsys):  # noqa: F811
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"x = {i}\n" * 30}) + "\n" for i in range(40)))
    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "train", "quickstart.yaml")
    out = tmp_path / "shards"
    rc = main(["data", "prepare", "--config", config, f"data.source={path}", f"data.tokenizer={tiny.tokenizer}",
               f"data.shards_dir={out}", "data.progress=false", "data.num_proc=1"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["shards_dir"] == str(out)
    assert read_manifest(str(out))["splits"]["train"]["documents"] + \
        read_manifest(str(out))["splits"]["val"]["documents"] == 40
    assert main(["data", "prepare", "data.vocab_size=8"]) == 2
    assert "overrides need --config" in capsys.readouterr().err
