"""Data pipeline throughput: `prepare` with 1 and 2 processes, loaders from shards and from streaming.

    python benchmarks/data.py [--max-bytes 12000000] [--context 256] [--batch 8] [--seconds 5]

Writes benchmarks/results/data.json and prints a Markdown table. Compares loader throughput with the tokens/s
the trainer consumes at xxs (benchmarks/results/step.json from benchmarks/step.py, when present). Timings on a
shared machine are noisy: read ratios, and rerun before trusting absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import DataConfig, build_loader  # noqa: E402
from data_pipeline.api import ensure_tokenizer  # noqa: E402
from data_pipeline.prepare import prepare_shards  # noqa: E402
from data_pipeline.sources import build_source  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _loader_rate(cfg: DataConfig, *, context: int, batch: int, workers: int, seconds: float) -> dict:
    loader = build_loader(cfg, split="train", context_length=context, micro_batch_size=batch, rank=0, world_size=1,
                          seed=0, num_workers=workers)
    next(loader)  # start-up (workers forking, first document) is not throughput
    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - start
    loader.close()
    tokens = batches * batch * context
    return {"workers": workers, "batches": batches, "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed), "windows_per_s": round(batches * batch / elapsed)}


def _trainer_rate() -> dict | None:
    """Tokens/s the trainer consumes at xxs, from benchmarks/step.py's output if it has been run."""
    path = RESULTS / "step.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    found: dict = {}

    def walk(node, trail):  # noqa: ANN001 - the step benchmark's schema is its own; find xxs tokens/s
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, trail + [str(key)])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, trail + [str(i)])
        elif isinstance(node, (int, float)) and "tokens_per_s" in trail[-1] and any("xxs" in str(t) for t in trail):
            found["/".join(trail)] = node

    walk(data, [])
    if not found:
        for row in data if isinstance(data, list) else data.get("results", []):
            if isinstance(row, dict) and row.get("size") == "xxs":
                for key, value in row.items():
                    if "tokens_per_s" in key or key in ("tok_per_s", "tokens_s"):
                        found[f"{row.get('kind', '?')}/{key}"] = value
    return found or {"note": "step.json present but no xxs tokens/s field found"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=12_000_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", default=str(RESULTS / "data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="ebt-bench-data-")
    try:
        cfg = DataConfig(source="embedded", max_bytes=args.max_bytes, include_docs=True, cache_dir=work,
                         vocab_size=args.vocab_size, progress=False)
        source = build_source(cfg)
        start = time.perf_counter()
        tok_dir, meta = ensure_tokenizer(cfg, source)
        tokenizer_s = time.perf_counter() - start
        prepare = []
        for procs in (1, 2):
            out = os.path.join(work, f"shards-{procs}")
            start = time.perf_counter()
            manifest = prepare_shards(source, tok_dir, out, num_proc=procs, progress=False)
            elapsed = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            prepare.append({"processes": procs, "tokens": tokens, "seconds": round(elapsed, 3),
                            "tokens_per_s": round(tokens / elapsed),
                            "tokenize_seconds": manifest["seconds"]["tokenize"]})
        shard_cfg = DataConfig(**{**cfg.__dict__, "shards_dir": os.path.join(work, "shards-1")})
        stream_cfg = DataConfig(**{**cfg.__dict__, "mode": "stream"})
        loaders = {
            "shards": [_loader_rate(shard_cfg, context=args.context, batch=args.batch, workers=w,
                                    seconds=args.seconds) for w in (0, 2)],
            "stream": [_loader_rate(stream_cfg, context=args.context, batch=args.batch, workers=w,
                                    seconds=args.seconds) for w in (0, 2)],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg": os.getloadavg()},
        "corpus": {**source.summary(), "vocab_size": meta.vocab_size},
        "tokenizer_train_seconds": round(tokenizer_s, 3),
        "context_length": args.context, "micro_batch_size": args.batch,
        "prepare": prepare, "loader": loaders, "trainer_xxs": _trainer_rate(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"corpus: {source.summary()['files']} files, {source.summary().get('bytes', '?')} bytes; "
          f"tokenizer trained in {tokenizer_s:.1f} s (vocab {meta.vocab_size})\n")
    print("| stage | setting | tokens/s |\n|---|---|---|")
    for row in prepare:
        print(f"| prepare | {row['processes']} process(es) | {row['tokens_per_s']:,} |")
    for mode, rows in loaders.items():
        for row in rows:
            print(f"| loader ({mode}) | {row['workers']} workers, ctx {args.context}, batch {args.batch} "
                  f"| {row['tokens_per_s']:,} |")
    print(f"\ntrainer at xxs: {result['trainer_xxs'] or 'benchmarks/results/step.json not found'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
