"""Stream mode (tokenize on the fly): exact resume with 0 and 2 workers, rank split, errors."""

import json

import numpy as np
import pytest
import torch
from data_support import tiny  # noqa: F401 - session fixture

from data_pipeline import build_eval_loader, build_loader, prepare_if_needed
from data_pipeline.sources import document_is_val
from data_pipeline.tokenizer import load_processor

CTX, BATCH = 64, 4


def _stream_cfg(tiny, **changes):  # noqa: F811
    return tiny.with_(mode="stream", **changes)


def _loader(cfg, **kw):
    args = dict(split="train", context_length=CTX, micro_batch_size=BATCH, rank=0, world_size=1, seed=0)
    args.update(kw)
    return build_loader(cfg, **args)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _expected_stream(tiny, split="train", rank=0, world=1):  # noqa: F811
    processor = load_processor(tiny.tokenizer)
    from data_support import tiny_corpus

    docs = [t for t in tiny_corpus().rank_documents(rank, world) if document_is_val(t, 0.25) == (split == "val")]
    return np.concatenate([processor.encode(t) + [2] for t in docs])


def test_stream_windows_are_the_packed_document_stream(tiny):  # noqa: F811
    stream = _expected_stream(tiny)
    loader = _loader(_stream_cfg(tiny))
    batches = torch.cat(_take(loader, 10)).numpy()
    for i, row in enumerate(batches):
        assert np.array_equal(row, stream[i * CTX:i * CTX + CTX + 1])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_is_exact_across_an_epoch_boundary(tiny, workers):  # noqa: F811
    cfg = _stream_cfg(tiny)
    per_epoch = len(_expected_stream(tiny)) // CTX // BATCH
    saved_at, after = per_epoch - 2, 6  # the resumed part wraps into the second pass over the source
    reference = _take(_loader(cfg, num_workers=workers), saved_at + after)
    first = _loader(cfg, num_workers=workers)
    _take(first, saved_at)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["buffer"]  # a partly used document is carried in the state, not re-read or dropped
    first.close()
    resumed = _loader(cfg, num_workers=workers)
    resumed.load_state_dict(state)
    for expected, batch in zip(reference[saved_at:], _take(resumed, after), strict=True):
        assert torch.equal(expected, batch)
    assert resumed.state_dict()["epoch"] == 1


def test_stream_worker_count_may_change_at_resume(tiny):  # noqa: F811
    cfg = _stream_cfg(tiny)
    reference = _take(_loader(cfg), 12)
    saver = _loader(cfg, num_workers=2)
    _take(saver, 5)
    resumed = _loader(cfg, num_workers=0)
    resumed.load_state_dict(saver.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference[5:], _take(resumed, 7), strict=True))


def test_stream_ranks_read_disjoint_documents(tiny):  # noqa: F811
    cfg = _stream_cfg(tiny)
    for rank in range(2):
        stream = _expected_stream(tiny, rank=rank, world=2)
        got = torch.cat(_take(_loader(cfg, rank=rank, world_size=2), 3)).numpy()
        assert np.array_equal(got[:, :-1].reshape(-1), stream[:len(got) * CTX])
    shares = [set(map(tuple, np.split(s, np.flatnonzero(s == 2) + 1)[:-1]))
              for s in (_expected_stream(tiny, rank=r, world=2) for r in range(2))]
    assert shares[0] and shares[1] and not shares[0] & shares[1]


def test_stream_world_size_change_is_a_clear_error(tiny):  # noqa: F811
    cfg = _stream_cfg(tiny)
    saver = _loader(cfg, rank=0, world_size=2)
    _take(saver, 2)
    with pytest.raises(ValueError, match="saved with world size 2 but this run has 3; stream mode cannot reshard"):
        _loader(cfg, rank=0, world_size=3).load_state_dict(saver.state_dict())


def test_stream_eval_is_one_finite_pass(tiny):  # noqa: F811
    stream = _expected_stream(tiny, split="val")
    batches = list(build_eval_loader(_stream_cfg(tiny), context_length=CTX, micro_batch_size=BATCH))
    rows = torch.cat(batches).numpy()
    assert len(rows) == (len(stream) - 1) // CTX
    assert np.array_equal(rows[:, :-1].reshape(-1), stream[:len(rows) * CTX])


def test_stream_from_datasets_jsonl_resumes_exactly_with_workers(tmp_path, tiny):  # noqa: F811
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": f"def f{i}():\n    return {i * i}\n" * (i % 5 + 1)}) + "\n"
                            for i in range(120)))
    cfg = tiny.with_(mode="stream", source="hf:json", hf_data_files=[str(path)], text_field="body",
                     tokenizer=tiny.tokenizer, val_fraction=0.0)
    assert prepare_if_needed(cfg)["shards_dir"] is None  # stream mode prepares only the tokenizer
    reference = _take(_loader(cfg, num_workers=2), 14)
    saver = _loader(cfg, num_workers=2)
    _take(saver, 6)
    resumed = _loader(cfg, num_workers=2)
    resumed.load_state_dict(saver.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference[6:], _take(resumed, 8), strict=True))


def test_rank_without_documents_is_a_clear_error(tmp_path, tiny):  # noqa: F811
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "only one document here"}) + "\n")
    cfg = tiny.with_(mode="stream", source=str(path), tokenizer=tiny.tokenizer, val_fraction=0.0)
    with pytest.raises(ValueError, match="rank 1/2 gets no 'train' documents"):
        next(_loader(cfg, rank=1, world_size=2))
