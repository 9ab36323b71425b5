"""`ebt tokenizer train` and `ebt data prepare`: thin wrappers that build a DataConfig from flags.

This lives in launch/, not data_pipeline/: `--config` reads a training YAML through launch.config, and the data
package must not import the layer above it. Registration is argparse only; data_pipeline (whose package import
loads torch) and launch.config are imported when a command runs, so `ebt --help` stays fast
(tests/launch/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_pipeline.config import DataConfig


def _source_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("source")
    group.add_argument("--source", default="embedded",
                       help='"embedded" (stdlib + python3-doc), "hf:<dataset>" or comma-separated paths/globs '
                            "of .txt/.jsonl/.parquet files")
    group.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, hf)")
    group.add_argument("--hf-config", default=None, help="datasets config name")
    group.add_argument("--hf-split", default="train", help="datasets split")
    group.add_argument("--data-files", nargs="+", default=None, help="data_files for load_dataset")
    group.add_argument("--max-bytes", type=int, default=16_000_000, help="byte budget of the embedded corpus")
    group.add_argument("--no-docs", action="store_true", help="embedded corpus without python3-doc prose")
    group.add_argument("--cache-dir", default="data_cache", help="where derived tokenizers/shards go")
    group.add_argument("--vocab-size", type=int, default=4096)
    group.add_argument("--max-sentences", type=int, default=200_000,
                       help="cap on input sentences (lines) sampled for tokenizer training")
    group.add_argument("--num-proc", type=int, default=2, help="tokenizer processes")


def _config(args: argparse.Namespace, **extra: object) -> DataConfig:
    from data_pipeline.config import DataConfig

    return DataConfig(source=args.source, text_field=args.text_field, hf_config=args.hf_config,
                      hf_split=args.hf_split, hf_data_files=args.data_files, max_bytes=args.max_bytes,
                      include_docs=not args.no_docs, cache_dir=args.cache_dir, vocab_size=args.vocab_size,
                      tokenizer_max_sentences=args.max_sentences, num_proc=args.num_proc, **extra)


def _tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.api import ensure_tokenizer
    from data_pipeline.sources import build_source
    from data_pipeline.tokenizer import META_FILE, MODEL_FILE, load_meta, tokenizer_exists

    cfg = _config(args, tokenizer=args.out)
    start = time.perf_counter()
    source = build_source(cfg)
    if args.out and tokenizer_exists(args.out):
        meta = load_meta(args.out)
        same = (meta.sources_hash, meta.vocab_size, meta.max_sentences) == (
            source.fingerprint(), cfg.vocab_size, cfg.tokenizer_max_sentences)
        if not same and not args.force:
            differs = []
            if meta.vocab_size != cfg.vocab_size:
                differs.append(f"vocab size {meta.vocab_size} there, {cfg.vocab_size} now")
            if meta.max_sentences != cfg.tokenizer_max_sentences:
                differs.append(f"max sentences {meta.max_sentences} there, {cfg.tokenizer_max_sentences} now")
            if meta.sources_hash != source.fingerprint():
                differs.append("the source's files or contents differ")
            raise ValueError(f"{args.out!r} holds a tokenizer trained on other inputs or settings "
                             f"({'; '.join(differs)}); pass --force to retrain it there, or choose another --out")
        if not same:
            for name in (MODEL_FILE, META_FILE):
                os.unlink(os.path.join(args.out, name))
    path, meta = ensure_tokenizer(cfg, source)
    print(json.dumps({"tokenizer": path, "vocab_size": meta.vocab_size, "eos_id": meta.eos_id,
                      "sha256": meta.model_sha256, "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.api import prepare_if_needed

    if args.config:
        # Exactly the data a training run of this config will use (its `data:` section and overrides).
        from launch.config import load_config

        cfg = load_config(args.config, args.overrides).data
    elif args.overrides:
        raise ValueError(f"key=value overrides need --config (got {' '.join(args.overrides)})")
    else:
        cfg = _config(args, tokenizer=args.tokenizer, shards_dir=args.out, val_fraction=args.val_fraction,
                      shuffle_seed=args.seed, shard_tokens=args.shard_tokens, dtype=args.dtype,
                      progress=not args.no_progress)
    result = prepare_if_needed(cfg, force=args.force)
    if "manifest" not in result:  # stream mode: only the tokenizer is prepared
        print(json.dumps({"tokenizer": result["tokenizer"], "vocab_size": result["vocab_size"]}))
        return 0
    manifest = result["manifest"]
    print(json.dumps({"shards_dir": result["shards_dir"], "tokenizer": result["tokenizer"], "dtype": manifest["dtype"],
                      "splits": {k: {"documents": v["documents"], "tokens": v["tokens"],
                                     "shards": len(v["shards"])} for k, v in manifest["splits"].items()}}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser("train", help="train a sentencepiece BPE tokenizer (exact round trip for code)")
    _source_flags(train)
    train.add_argument("--out", default=None, help="output directory (default: under --cache-dir)")
    train.add_argument("--force", action="store_true", help="retrain over a tokenizer of other inputs in --out")
    train.set_defaults(func=_tokenizer_train)

    data = subparsers.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="tokenize a source into packed token shards + manifest")
    _source_flags(prepare)
    prepare.add_argument("--config", default=None,
                         help="a training YAML: prepare its `data:` section (the source flags are then ignored)")
    prepare.add_argument("overrides", nargs="*", help="key=value overrides of --config, as for `ebt train`")
    prepare.add_argument("--tokenizer", default=None, help="tokenizer directory (trained there if missing)")
    prepare.add_argument("--out", default=None, help="shard directory (default: under --cache-dir)")
    prepare.add_argument("--val-fraction", type=float, default=0.02)
    prepare.add_argument("--seed", type=int, default=0, help="document shuffle seed")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 25)
    prepare.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    prepare.add_argument("--force", action="store_true", help="replace shards of other inputs in --out")
    prepare.add_argument("--no-progress", action="store_true")
    prepare.set_defaults(func=_data_prepare)
