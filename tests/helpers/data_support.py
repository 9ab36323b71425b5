"""Shared, built-once fixtures for the data tests: a tiny stdlib corpus, a 512-piece tokenizer, shards.

Kept in a module (cached with lru_cache) rather than conftest.py so the data tests own their helpers; every
test module that imports `tiny` gets the same objects, built once per session.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, replace

import pytest

from data_pipeline import DataConfig, prepare_if_needed
from data_pipeline.sources import EmbeddedCorpus

TINY_BYTES = 300_000
VOCAB = 512


@dataclass(frozen=True)
class Tiny:
    root: str
    cfg: DataConfig  # shards mode over the tiny embedded corpus
    tokenizer: str
    shards_dir: str

    def with_(self, **changes) -> DataConfig:
        return replace(self.cfg, **changes)


@functools.lru_cache(maxsize=1)
def build_tiny() -> Tiny:
    root = tempfile.mkdtemp(prefix="ebt-data-tests-")
    atexit.register(shutil.rmtree, root, True)
    cfg = DataConfig(source="embedded", max_bytes=TINY_BYTES, include_docs=False, cache_dir=root,
                     vocab_size=VOCAB, tokenizer_max_sentences=20_000, val_fraction=0.25, num_proc=1,
                     shard_tokens=30_000, progress=False)
    result = prepare_if_needed(cfg)
    return Tiny(root=root, cfg=cfg, tokenizer=result["tokenizer"], shards_dir=result["shards_dir"])


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return build_tiny()


def tiny_corpus() -> EmbeddedCorpus:
    return EmbeddedCorpus(max_bytes=TINY_BYTES, include_docs=False)


def listing(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
