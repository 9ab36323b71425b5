"""Data pipeline: sources, sentencepiece tokenizers, packed token shards and exactly resumable loaders."""

from .api import build_eval_loader, build_loader, check_splits, prepare_if_needed, vocab_size
from .config import DataConfig

__all__ = ["DataConfig", "build_eval_loader", "build_loader", "check_splits", "prepare_if_needed",
           "vocab_size"]
