"""Shard-mode loader: exact resume (0 and 2 workers), rank sharding, reshard, eval loader, input errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from data_support import tiny  # noqa: F401 - session fixture

from data_pipeline import build_eval_loader, build_loader, prepare_if_needed, vocab_size
from data_pipeline.prepare import read_manifest
from data_pipeline.sampler import advance, epoch_permutation, rank_batches

CTX, BATCH = 128, 4


def _loader(tiny, **kw):  # noqa: F811
    args = dict(split="train", context_length=CTX, micro_batch_size=BATCH, rank=0, world_size=1, seed=7)
    args.update(kw)
    cfg = args.pop("cfg", tiny.cfg)
    return build_loader(cfg, **args)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _windows_per_epoch(tiny):  # noqa: F811
    return _loader(tiny).shards.n_windows


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_across_an_epoch_boundary(tiny, workers):  # noqa: F811
    per_epoch = _windows_per_epoch(tiny) // BATCH
    saved_at, after = per_epoch - 3, 8  # the resumed part crosses into epoch 1
    reference = _take(_loader(tiny, num_workers=workers), saved_at + after)
    first = _loader(tiny, num_workers=workers)
    _take(first, saved_at)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a plain-JSON checkpoint
    resumed = _loader(tiny, num_workers=workers)
    resumed.load_state_dict(state)
    got = _take(resumed, after)
    for expected, batch in zip(reference[saved_at:], got, strict=True):
        assert batch.dtype == torch.long and batch.shape == (BATCH, CTX + 1)
        assert torch.equal(expected, batch)
    assert resumed.state_dict()["epoch"] == 1


def test_worker_count_may_change_at_resume(tiny):  # noqa: F811
    reference = _take(_loader(tiny), 10)
    saver = _loader(tiny, num_workers=2)
    _take(saver, 4)
    resumed = _loader(tiny, num_workers=0)
    resumed.load_state_dict(saver.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference[4:], _take(resumed, 6), strict=True))


def test_windows_are_shard_slices_and_epoch_is_a_permutation(tiny):  # noqa: F811
    loader = _loader(tiny, micro_batch_size=1)
    shards = loader.shards
    n = shards.n_windows
    seen = [next(loader)[0] for _ in range(n)]
    perm = epoch_permutation(7, 0, n)
    for window, index in zip(seen[:50], perm[:50], strict=False):
        shard = int(np.searchsorted(shards.window_starts, index, side="right") - 1)
        start = int(index - shards.window_starts[shard]) * CTX
        tokens = np.load(shards.files[shard])[start:start + CTX + 1]
        assert np.array_equal(window.numpy(), tokens.astype(np.int64))
    assert len({tuple(w.tolist()) for w in seen}) == n  # every window once in the epoch
    assert not np.array_equal(epoch_permutation(7, 1, n), perm)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(tiny, world):  # noqa: F811
    n = _windows_per_epoch(tiny)
    per_rank = n // world
    loaders = [_loader(tiny, rank=r, world_size=world, micro_batch_size=1) for r in range(world)]
    shards = loaders[0].shards
    seen = [set() for _ in range(world)]
    for rank, loader in enumerate(loaders):
        for _ in range(per_rank):
            seen[rank].add(tuple(next(loader)[0].tolist()))
    union = set().union(*seen)
    assert sum(len(s) for s in seen) == len(union) == per_rank * world  # disjoint, nothing repeated
    everything = {tuple(row.tolist()) for row in shards.read(np.arange(n))}
    assert len(everything - union) == n - per_rank * world < world  # only the per-epoch remainder is skipped
    assert len({json.dumps(loader.state_dict(), sort_keys=True) for loader in loaders}) == 1  # global position


def test_reshard_from_two_ranks_to_three_continues_the_same_epoch(tiny):  # noqa: F811
    n = _windows_per_epoch(tiny)
    two = [_loader(tiny, rank=r, world_size=2, micro_batch_size=1) for r in range(2)]
    consumed = [w for _ in range(10) for loader in two for w in next(loader)]
    state = two[0].state_dict()
    three = [_loader(tiny, rank=r, world_size=3, micro_batch_size=1) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
    remaining = (n - 20) // 3
    consumed += [w for _ in range(remaining) for loader in three for w in next(loader)]
    keys = [tuple(w.tolist()) for w in consumed]
    assert len(keys) == len(set(keys)) == n - (n - 20) % 3  # no window twice, at most W-1 skipped
    assert (three[0].state_dict()["epoch"], three[0].state_dict()["offset"]) == (1, 0)  # epoch 0 is done


@pytest.mark.parametrize("n, world, batch", [(10, 3, 4), (7, 1, 3), (9, 2, 5), (12, 4, 1)])
def test_advance_matches_iteration(n, world, batch):
    # Resuming from `advance(k batches)` must continue exactly where the uninterrupted stream is.
    def flat(epoch, offset, count):
        it = rank_batches(3, n, world, 1 % world, epoch, offset, batch)
        return np.concatenate([next(it) for _ in range(count)])

    reference = flat(0, 0, 30)
    for k in range(25):
        epoch, offset = advance(n, world, 0, 0, k * batch)
        assert np.array_equal(flat(epoch, offset, 5), reference[k * batch:(k + 5) * batch])


def test_eval_loader_yields_every_window_once(tiny):  # noqa: F811
    parts = [list(build_eval_loader(tiny.cfg, context_length=CTX, micro_batch_size=3, rank=r, world_size=2))
             for r in range(2)]
    rows = [row for part in parts for batch in part for row in batch]
    manifest = read_manifest(tiny.shards_dir)
    expected = sum((s["tokens"] - 1) // CTX for s in manifest["splits"]["val"]["shards"])
    assert len(rows) == expected and len({tuple(r.tolist()) for r in rows}) == expected
    loader = build_eval_loader(tiny.cfg, context_length=CTX, micro_batch_size=3)
    assert len(loader) == len(list(loader)) == -(-expected // 3)
    # Consecutive windows share one token: window i+1 starts where window i ends.
    batch = next(iter(loader))
    assert torch.equal(batch[0, -1], batch[1, 0])


def test_prepare_if_needed_is_idempotent_and_reports_vocab(tiny):  # noqa: F811
    assert vocab_size(tiny.cfg) == 512
    again = prepare_if_needed(tiny.cfg)
    assert again["shards_dir"] == tiny.shards_dir and again["tokenizer"] == tiny.tokenizer


def test_missing_shards_and_missing_tokenizer(tmp_path, tiny):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        _loader(tiny, cfg=tiny.with_(shards_dir=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        _loader(tiny, cfg=tiny.with_(cache_dir=str(tmp_path / "fresh")))


def test_tokenizer_hash_mismatch_is_rejected(tmp_path, tiny):  # noqa: F811
    other = tiny.with_(cache_dir=str(tmp_path), vocab_size=400, shards_dir=None)
    prepare_if_needed(other)  # a different tokenizer ...
    mixed = tiny.with_(cache_dir=str(tmp_path), vocab_size=400, shards_dir=tiny.shards_dir)
    with pytest.raises(ValueError, match=r"tokenizer hash \w{12} differs from the hash \w{12} the shards in"):
        _loader(tiny, cfg=mixed)  # ... pointed at shards made with the first one


def test_vocab_larger_than_shard_dtype_is_rejected(tmp_path, tiny):  # noqa: F811
    copy = tmp_path / "shards"
    shutil.copytree(tiny.shards_dir, copy)
    manifest = read_manifest(str(copy))
    manifest["tokenizer"]["vocab_size"] = 70_000
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from data_pipeline.shards import PackedShards

    with pytest.raises(ValueError, match="vocab size 70000 does not fit the shard dtype uint16"):
        PackedShards(str(copy), "train", CTX)


def test_context_longer_than_shards_is_rejected(tiny):  # noqa: F811
    longest = max(s["tokens"] for s in read_manifest(tiny.shards_dir)["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match=f"context length {longest} is longer than the 'train' shards"):
        _loader(tiny, context_length=longest)
    assert _loader(tiny, context_length=longest - 1).shards.n_windows >= 1


def test_state_of_other_shards_or_context_is_rejected(tiny):  # noqa: F811
    state = _loader(tiny).state_dict()
    with pytest.raises(ValueError, match="context_length=128 but this run has 64"):
        _loader(tiny, context_length=64).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=7 but this run has 8"):
        _loader(tiny, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        _loader(tiny, rank=2, world_size=2)


def test_workers_reopen_memmaps(tiny):  # noqa: F811
    loader = _loader(tiny)
    next(loader)
    assert loader.shards._maps is not None
    clone = __import__("pickle").loads(__import__("pickle").dumps(loader.shards))
    assert clone._maps is None and os.path.isfile(clone.files[0])


def test_explicit_paths_work_without_the_raw_source(tmp_path, tiny):  # noqa: F811
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}():\n    return {i}\n" * 20}) + "\n" for i in range(60)))
    cfg = tiny.with_(source=str(corpus), tokenizer=tiny.tokenizer, shards_dir=str(tmp_path / "shards"),
                     val_fraction=0.0)
    made = prepare_if_needed(cfg)
    reference = _take(_loader(tiny, cfg=cfg), 3)
    corpus.unlink()  # e.g. a training node that only has the shards
    assert prepare_if_needed(cfg)["manifest"] == made["manifest"]
    assert vocab_size(cfg) == 512
    assert all(torch.equal(a, b) for a, b in zip(reference, _take(_loader(tiny, cfg=cfg), 3), strict=True))
    with pytest.raises(FileNotFoundError, match="corpus.jsonl' does not exist"):
        prepare_if_needed(cfg, force=True)


def test_epoch_after_a_worker_resume_is_complete(tiny):  # noqa: F811
    # With persistent workers, datasets-style loaders shorten the epochs after a resume; here the next
    # epoch must still be a full permutation of every window.
    n = _windows_per_epoch(tiny)
    first = _loader(tiny, num_workers=2, micro_batch_size=1)
    _take(first, n // 2)
    resumed = _loader(tiny, num_workers=2, micro_batch_size=1)
    resumed.load_state_dict(first.state_dict())
    first.close()
    _take(resumed, n - n // 2)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["offset"] == 0
    epoch_one = [tuple(b[0].tolist()) for b in _take(resumed, n)]
    assert len(set(epoch_one)) == n and resumed.state_dict()["epoch"] == 2


def test_empty_val_split_names_the_fraction(tmp_path, tiny):  # noqa: F811
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"y = {i}\n" * 40}) + "\n" for i in range(20)))
    cfg = tiny.with_(source=str(corpus), tokenizer=tiny.tokenizer, shards_dir=str(tmp_path / "s"), val_fraction=0.0)
    prepare_if_needed(cfg)
    with pytest.raises(ValueError, match=r"split 'val' .* has no tokens \(val_fraction=0.0 selected no documents\)"):
        build_eval_loader(cfg, context_length=CTX, micro_batch_size=2)


@pytest.mark.parametrize("mode", ["shards", "stream"])
@pytest.mark.parametrize("limit", [0, 10])
def test_global_eval_share_is_the_same_sequences_for_any_world_and_batch(tiny, mode, limit):  # noqa: F811
    """Validation's set: the first `limit` windows of the 1-rank eval loader, split i mod W over the ranks."""
    from data_pipeline.loader import global_eval_share

    cfg = tiny.cfg if mode == "shards" else tiny.with_(mode="stream")

    def share(rank, world, batch):
        whole = build_eval_loader(cfg, context_length=CTX, micro_batch_size=3)
        return [row.tolist() for b in global_eval_share(whole, limit=limit, rank=rank, world_size=world,
                                                         batch_size=batch) for row in b]

    reference = [row.tolist() for b in build_eval_loader(cfg, context_length=CTX, micro_batch_size=5) for row in b]
    reference = reference[:limit] if limit else reference
    assert len(reference) == (limit or len(reference)) and len(reference) > 3
    assert share(0, 1, 4) == reference
    for world, batch in ((2, 1), (3, 2)):
        parts = [share(rank, world, batch) for rank in range(world)]
        assert [parts[i % world][i // world] for i in range(len(reference))] == reference
        assert sum(map(len, parts)) == len(reference)
    with pytest.raises(ValueError, match="1-rank loader"):
        global_eval_share(build_eval_loader(tiny.cfg, context_length=CTX, micro_batch_size=3, rank=1, world_size=2),
                          limit=0, rank=0, world_size=1, batch_size=2)
