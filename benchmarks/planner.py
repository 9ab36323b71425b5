"""Memory planner accuracy: predicted against measured peak RSS over a grid of sizes x batch x policy x K.

The first grid point is the ONE calibration run (it fixes the process base and the allocator factor, see
ebt/planner.py); every other point is a prediction. Each point is measured in its own process (1 warm-up and
1 measured step, one thread, denormals flushed); its peak RSS is the process's own.

    python -m benchmarks.planner          # writes results/planner.json and the README table
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.common import peak_rss_mb, run_isolated, write_results

# (size, context, vocab, batch, policy, K); the first row calibrates.
GRID = [
    ("3xs", 128, 4096, 4, "none", 2),
    ("3xs", 128, 4096, 8, "none", 2),
    ("3xs", 128, 4096, 8, "mcmc_step", 2),
    ("3xs", 128, 4096, 8, "block+mcmc_step", 2),
    ("3xs", 128, 4096, 8, "block", 2),
    ("3xs", 128, 4096, 8, "mcmc_step", 4),
    ("3xs", 128, 4096, 8, "none", 4),
    ("3xs", 128, 4096, 2, "mcmc_step", 2),
    ("4xs", 128, 4096, 8, "none", 2),
    ("4xs", 128, 4096, 8, "mcmc_step", 4),
    ("4xs", 64, 2048, 16, "none", 3),
    ("xxs", 64, 4096, 4, "none", 2),
    ("xxs", 64, 4096, 4, "mcmc_step", 2),
    ("xxs", 128, 4096, 4, "block+mcmc_step", 3),
]


def measure(args: argparse.Namespace) -> dict:
    from ebt import ModelConfig, build_model

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    base = peak_rss_mb()
    cfg = ModelConfig.from_size(args.size, vocab_size=args.vocab, context_length=args.context,
                                mcmc_steps=args.k, checkpointing=args.policy)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1))
    for _ in range(2):
        loss, _ = model.loss(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"base_mb": base, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="store_true", help="measure one point in this process")
    parser.add_argument("--size", default="3xs")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--policy", default="none")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--from-json", action="store_true", help="re-predict results/planner.json's measurements")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(args)))
        return
    from rich.progress import track

    from ebt import ModelConfig
    from ebt.planner import calibrate, predict_peak_bytes, tensor_peak_bytes

    rows = []
    if args.from_json:  # re-predict stored measurements (after a planner change) without re-measuring
        from benchmarks.common import RESULTS_DIR

        stored = json.loads((RESULTS_DIR / "planner.json").read_text())["rows"]
        measured_by_point = {(r["size"], r["context"], r["vocab"], r["batch"], r["policy"], r["k"]):
                             {"base_mb": r["base_mb"], "peak_rss_mb": r["peak_rss_mb"]} for r in stored}
    for size, context, vocab, batch, policy, k in track(GRID, description="planner grid"):
        if args.from_json:
            cfg = ModelConfig.from_size(size, vocab_size=vocab, context_length=context, mcmc_steps=k)
            rows.append({"size": size, "context": context, "vocab": vocab, "batch": batch, "policy": policy, "k": k,
                         "tensor_peak_mb": tensor_peak_bytes(cfg, policy, batch) / 2**20,
                         **measured_by_point[(size, context, vocab, batch, policy, k)]})
            continue
        measured = run_isolated(["benchmarks.planner", "--point", f"--size={size}", f"--context={context}",
                                 f"--vocab={vocab}", f"--batch={batch}", f"--policy={policy}", f"--k={k}"])
        cfg = ModelConfig.from_size(size, vocab_size=vocab, context_length=context, mcmc_steps=k)
        rows.append({"size": size, "context": context, "vocab": vocab, "batch": batch, "policy": policy, "k": k,
                     "tensor_peak_mb": tensor_peak_bytes(cfg, policy, batch) / 2**20, **measured})
    first = rows[0]
    cfg0 = ModelConfig.from_size(first["size"], vocab_size=first["vocab"], context_length=first["context"],
                                 mcmc_steps=first["k"])
    cal = calibrate(first["peak_rss_mb"] * 2**20, first["base_mb"] * 2**20, cfg0, first["policy"], first["batch"])
    for row in rows:
        cfg = ModelConfig.from_size(row["size"], vocab_size=row["vocab"], context_length=row["context"],
                                    mcmc_steps=row["k"])
        row["predicted_mb"] = predict_peak_bytes(cfg, row["policy"], row["batch"], "cpu", cal) / 2**20
        row["error"] = row["predicted_mb"] / row["peak_rss_mb"] - 1
    checked = rows[1:]
    worst = max(abs(r["error"]) for r in checked)
    payload = {"calibration": {"base_mb": cal.base_bytes / 2**20, "factor": cal.factor}, "rows": rows,
               "max_abs_error": worst, "within_15pct": sum(abs(r["error"]) <= 0.15 for r in checked),
               "points": len(checked), "torch": torch.__version__}
    lines = [
        "## Memory planner (`python -m benchmarks.planner`): predicted vs measured peak RSS",
        "",
        f"Calibrated on the first row (base {cal.base_bytes / 2**20:.0f} MB, allocator factor {cal.factor:.2f}); "
        f"{payload['within_15pct']}/{len(checked)} predictions within 15%, worst {worst:.1%}.",
        "",
        "The tensor timeline itself is accurate (a rescaled tiny replica is within 8% of a direct trace, "
        "tests/test_second_order_planner.py; with glibc told to mmap every allocation, MALLOC_MMAP_THRESHOLD_="
        "65536, measured RSS minus base was 1.23x the traced peak for none and 1.28x for mcmc_step). What one "
        "calibration factor cannot capture is glibc heap fragmentation, which differs by policy: about 2.1x for "
        "none-like runs but about 1.5x for the recompute policies. The misses are therefore OVER-predictions for "
        "mcmc_step policies (the safe direction for `auto`); none-like rows are within 7%.",
        "",
        "| size | context | vocab | batch | policy | K | tensor peak (MB) | predicted (MB) | measured (MB) | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        error = "calibration" if i == 0 else f"{r['error']:+.1%}"
        lines.append(f"| {r['size']} | {r['context']} | {r['vocab']} | {r['batch']} | {r['policy']} | {r['k']} | "
                     f"{r['tensor_peak_mb']:.0f} | {r['predicted_mb']:.0f} | {r['peak_rss_mb']:.0f} | {error} |")
    table = "\n".join(lines)
    path = write_results("planner", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
