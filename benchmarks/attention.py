"""Candidate attention, second-order: forward + inner gradient (create_graph) + outer backward, per implementation.

Shapes are one xxs layer of the training benchmark (batch 8, 6 heads, 256 candidates over 256 real keys, head
width 64), fp32, one thread. Reports the median CPU time of the three passes and the bytes the forward leaves
saved for backward (what a policy without checkpointing holds per layer and step). Implementations:
benchmarks/experimental/attention_impls.py; the fastest correct one is the default in ebt/attention.py.

    python -m benchmarks.attention
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import write_results
from benchmarks.experimental.attention_impls import IMPLEMENTATIONS
from ebt.attention import visibility_bias


def second_order_pass(fn, tensors, bias) -> None:
    out = fn(*tensors, bias)
    grads = torch.autograd.grad((out * out).sum(), tensors, create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in grads), tensors)


def saved_bytes(fn, tensors, bias) -> int:
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    inputs = {t.untyped_storage().data_ptr() for t in (*tensors, bias)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*tensors, bias)
    return sum(n for ptr, n in seen.items() if ptr not in inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    tensors = [torch.randn(shape, requires_grad=True) for _ in range(5)]
    bias = visibility_bias(torch.arange(args.length), args.length, torch.float32)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(args.repeats + 1):  # interleaved, so load changes hit every implementation alike
        for name, fn in IMPLEMENTATIONS.items():
            start = time.process_time()
            second_order_pass(fn, tensors, bias)
            times[name].append(time.process_time() - start)
    rows = {name: {"cpu_s": statistics.median(t[1:]), "saved_forward_mb": saved_bytes(fn, tensors, bias) / 2**20}
            for name, t in times.items() for fn in [IMPLEMENTATIONS[name]]}
    fastest = min(rows, key=lambda n: rows[n]["cpu_s"])
    payload = {"config": vars(args), "torch": torch.__version__, "results": rows, "fastest": fastest}
    lines = [
        f"## Candidate attention, second order (`python -m benchmarks.attention`): batch {args.batch}, "
        f"{args.heads} heads, {args.length} candidates x {args.length} real keys, head width {args.head_dim}, "
        "fp32, 1 thread",
        "",
        "Forward + inner gradient (create_graph) + outer backward, median CPU time of "
        f"{args.repeats} interleaved repeats; forward-saved bytes are what each layer keeps per step without "
        "checkpointing.",
        "",
        "| implementation | CPU s | x explicit | forward saves (MB) |",
        "|---|---|---|---|",
    ]
    base = rows["explicit"]["cpu_s"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['cpu_s']:.3f} | {row['cpu_s'] / base:.2f}x | {row['saved_forward_mb']:.1f} |")
    lines.append(f"\nFastest: **{fastest}**.")
    table = "\n".join(lines)
    path = write_results("attention", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
