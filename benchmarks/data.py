"""Data pipeline throughput: `prepare` with 1 and 2 processes, loaders from shards and from streaming.

    python -m benchmarks.data [--max-bytes 12000000] [--context 256] [--batch 8] [--seconds 4]

Writes benchmarks/results/data.json and the data section of benchmarks/README.md. Compares loader throughput
with the tokens/s the trainer consumes at xxs (benchmarks/results/step.json from benchmarks/step.py, when
present). Timings on a shared machine are noisy: read ratios, and rerun before trusting absolute numbers.
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

from benchmarks.common import write_results  # noqa: E402
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
    """Tokens/s one training process consumes (benchmarks/step.py's result), when it has been run."""
    path = RESULTS / "step.json"
    if not path.exists():
        return None
    step = json.loads(path.read_text())
    config = step.get("config", {})
    return {"size": config.get("size"), "context": config.get("context"), "batch": config.get("batch"),
            "transformer_tokens_per_s": step.get("transformer", {}).get("tokens_per_s"),
            "ebt_tokens_per_s": step.get("ebt", {}).get("tokens_per_s")}


def _table(result: dict, args: argparse.Namespace) -> str:
    corpus = result["corpus"]
    lines = [
        f"## Data pipeline (`python -m benchmarks.data`): embedded corpus, {corpus['files']} files, "
        f"{corpus['bytes'] / 1e6:.1f} MB, vocab {corpus['vocab_size']}, context {args.context}, batch {args.batch}",
        "",
        f"Tokenizer training (BPE, capped input): {result['tokenizer_train_seconds']:.1f} s. Load average during "
        f"the run: {result['machine']['load_avg'][0]:.1f} on {result['machine']['cpus']} cores (shared machine: "
        "multi-process rows are unreliable here).",
        "",
        "| stage | setting | tokens/s |",
        "|---|---|---|",
    ]
    for row in result["prepare"]:
        lines.append(f"| `ebt data prepare` | {row['processes']} process(es) | {row['tokens_per_s']:,} |")
    for mode, rows in result["loader"].items():
        for row in rows:
            lines.append(f"| loader, {mode} | {row['workers']} workers | {row['tokens_per_s']:,} |")
    trainer = result["trainer_xxs"]
    if trainer and trainer.get("transformer_tokens_per_s"):
        shard = result["loader"]["shards"][0]["tokens_per_s"]
        stream = result["loader"]["stream"][0]["tokens_per_s"]
        fastest = max(trainer["transformer_tokens_per_s"], trainer["ebt_tokens_per_s"] or 0)
        lines += [f"| trainer step ({trainer['size']}, Transformer++) | 1 process | "
                  f"{trainer['transformer_tokens_per_s']:,.0f} |",
                  f"| trainer step ({trainer['size']}, EBT) | 1 process | {trainer['ebt_tokens_per_s']:,.0f} |",
                  "", f"Shard loading serves {shard / fastest:,.0f}x and streaming {stream / fastest:,.0f}x what one "
                  "training process consumes (benchmarks/results/step.json), so data is not the bottleneck."]
    else:
        lines += ["", "Trainer consumption: benchmarks/results/step.json not found (run `python -m benchmarks.step`)."]
    lines += ["", "Target: shard loading >= 1M tokens/s per process (0 workers is the fast path: reads are memmap "
              "slices; workers add process hand-offs and only pay off for streaming tokenization on idle cores)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=12_000_000)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
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
    table = _table(result, args)
    path = write_results("data", result, table)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
