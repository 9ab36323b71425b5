"""Does the best learning rate transfer across widths? 5 LRs x 4 widths x both kinds, short `ebt train` runs on
the quickstart's data, under SP and μP (issue 24).

Every run is the README's quickstart config (configs/train/quickstart.yaml: the embedded corpus, vocab 2048, the
ebt_think loop; plus configs/recipes/transformer.yaml for Transformer++) at 2 layers, head width 16 and context
32, differing only in width, LR and parametrization (μP's base width is the smallest), trained in this process
through launch.train.run_training, and judged by its final validation loss. Under μP the best LR should move
by at most the grid's factor of 2 from the smallest width to the largest; under SP it usually falls with width.

    python -m benchmarks.lr_transfer                     # JSON in benchmarks/results, table in benchmarks/README.md
    python -m benchmarks.lr_transfer --steps 60 --widths 32 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HEAD_DIM = 16


def run(kind: str, parametrization: str, width: int, lr: float, *, steps: int, base_dim: int, runs_dir: Path,
        cache_dir: Path) -> float:
    """Final validation loss of one short run."""
    from launch.config import load_config
    from launch.train import run_training

    files = [REPO / "configs" / "train" / "quickstart.yaml"]
    if kind == "transformer":
        files.append(REPO / "configs" / "recipes" / "transformer.yaml")
    name = f"{kind}-{parametrization}-w{width}-lr{lr:g}"
    overrides = [
        f"name={name}", f"runs_dir={runs_dir}", f"data.cache_dir={cache_dir}", "data.progress=false",
        f"model.parametrization={parametrization}", f"model.mup.base_dim={base_dim}",
        f"model.architecture.dim={width}", f"model.architecture.n_heads={width // HEAD_DIM}",
        "model.architecture.n_layers=2", "model.architecture.context_length=32",
        f"optim.lr={lr}", "optim.warmup_steps=10",
        f"trainer.max_steps={steps}", "trainer.micro_batch_size=8", f"trainer.log_every={steps}",
        f"trainer.eval_every={steps}", "trainer.eval_batches=8",
        "checkpoint.every=0", "checkpoint.save_final=false", "logging.progress=false", "logging.wandb=false",
    ]
    result = run_training(load_config(files, overrides), log=lambda *_: None)
    loss = result.get("val_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else float("inf")


def best_lr(losses: dict[float, float]) -> float:
    return min(losses, key=losses.get)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kinds", nargs="+", default=["ebt", "transformer"])
    parser.add_argument("--parametrizations", nargs="+", default=["sp", "mup"])
    parser.add_argument("--cache-dir", type=Path, default=REPO / "data_cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "lr_transfer.json"
    start, load = time.time(), os.getloadavg()[0]
    table: dict = {}
    with tempfile.TemporaryDirectory(prefix="ebt-lr-transfer-") as runs:
        for kind in args.kinds:
            for parametrization in args.parametrizations:
                for width in args.widths:
                    losses = {}
                    for lr in args.lrs:
                        losses[lr] = run(kind, parametrization, width, lr, steps=args.steps,
                                         base_dim=min(args.widths), runs_dir=Path(runs), cache_dir=args.cache_dir)
                        print(f"{kind:12s} {parametrization:4s} width {width:4d} lr {lr:<7g} val loss "
                              f"{losses[lr]:.4f}  ({time.time() - start:.0f} s)", flush=True)
                    table.setdefault(kind, {}).setdefault(parametrization, {})[str(width)] = {
                        "val_loss": {str(k): v for k, v in losses.items()}, "best_lr": best_lr(losses)}
                    # Kept after every width: a long sweep that stops still leaves what it measured.
                    out.write_text(json.dumps({"table": table, "steps": args.steps, "lrs": args.lrs,
                                               "widths": args.widths, "load_before": load,
                                               "wall_s": time.time() - start}, indent=1))
    summary = {"table": table, "steps": args.steps, "lrs": args.lrs, "widths": args.widths, "load_before": load,
               "load_after": os.getloadavg()[0], "wall_s": time.time() - start}
    out.write_text(json.dumps(summary, indent=1))
    for kind, by_p in table.items():
        for parametrization, by_w in by_p.items():
            best = [by_w[str(w)]["best_lr"] for w in args.widths]
            shift = max(best) / min(best)
            print(f"{kind:12s} {parametrization:4s} best LR by width {best}: spread {shift:g}x")
    print(f"wrote {out} ({summary['wall_s']:.0f} s, load {load:.2f} -> {summary['load_after']:.2f})")


if __name__ == "__main__":
    main()
