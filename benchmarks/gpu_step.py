"""GPU training step: tokens/s, bf16 MFU and peak memory for EBT and Transformer++, plus EBT memory per policy
and the EBT step under distributed.strategy=fsdp (FSDP2 with the bf16 mixed-precision policy, and fsdp_regather).

Run by benchmarks/gpu_step.sh on a lent H200 (its budget is 15 minutes; this stays well under 8). On a machine
without CUDA it runs on CPU in fp32, which only checks the script (use --tiny).

The fsdp points run launch/fsdp.py's routes on a 1-rank mesh (one process group of one GPU): what sharding's
hooks, all-gathers and copies cost per step where there is nothing to shard over; on several GPUs the parameter
and optimizer memory then drops to 1/world (benchmarks/sharding.py measures that on CPU).

MFU counts MODEL FLOPs only (ebt.flops.train_flops_per_token: K second-order MCMC steps, context cached); the
recompute that a checkpointing policy adds is not counted, so a policy that recomputes shows a lower MFU for
the same model work, as with activation checkpointing in Transformer MFU conventions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import add_workload_args
from fsutil import atomic_write_text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _process_group(device: torch.device) -> None:
    """A world of one for the fsdp points (fully_shard needs a process group)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def run_point(args, kind: str, policy: str, steps: int, warmup: int, chunk: int = 0,
              sharding: str | None = None) -> dict:
    from ebt import ModelConfig, build_model
    from ebt.checkpointing import apply_checkpointing
    from ebt.flops import train_flops_per_token
    from planning import DEFAULT_CUDA, cuda_peak, predict_peak_bytes

    device = torch.device(args.device)
    cfg = ModelConfig.from_size(args.size, kind=kind,
                                architecture={"vocab_size": args.vocab, "context_length": args.context},
                                thinking={"mcmc_steps": args.mcmc_steps})
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    if kind == "ebt":
        apply_checkpointing(model, policy, chunk)
    bf16 = device.type == "cuda"
    sharded = None
    if sharding is not None:
        from torch.distributed.device_mesh import init_device_mesh

        from launch.fsdp import regather_model, shard_model

        _process_group(device)
        for param in model.parameters():
            if param.dim() == 0:  # fully_shard shards dim 0 (as launch.trainer._scalar_params_as_1d)
                param.data = param.data.reshape(1)
        mesh = init_device_mesh(device.type, (1,))
        sharded = regather_model(model, mesh) if sharding == "fsdp_regather" else shard_model(model, mesh, bf16=bf16)
    # fused AdamW takes plain CUDA tensors; the sharded parameters are DTensors (foreach handles them).
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01,
                                  fused=device.type == "cuda" and sharded is None)
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    error = None
    try:
        for _ in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            context = sharded.step() if sharding == "fsdp_regather" else contextlib.nullcontext()
            with context:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    # Through forward (model(...), not model.loss): FSDP's hooks and the root's gather hook.
                    loss, _ = model(tokens) if sharded is not None else model.loss(tokens)
                loss.backward()
            if sharded is not None:
                sharded.reshard()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as oom:  # a policy that does not fit is a result, not a crash
        error = f"OOM: {str(oom).splitlines()[0]}"
    step_s = statistics.median(times[warmup:]) if len(times) > warmup else None
    tokens_per_s = args.batch * args.context / step_s if step_s else None
    flops = train_flops_per_token(cfg)
    peak_flops = args.peak_flops
    row = {
        "kind": kind, "policy": policy, "remat_chunk": chunk, "sharding": sharding, "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops,
        "mfu": tokens_per_s * flops / peak_flops if tokens_per_s and peak_flops else None,
        "peak_memory_mb": _peak_mb(device), "error": error,
        "predicted_peak_mb": predict_peak_bytes(cfg, policy if kind == "ebt" else "none", args.batch, device,
                                                remat_chunk=chunk,
                                                dtype_bytes=4) / 2**20 if kind == "ebt" else None,
    }
    # The sweep's analytic CUDA plan (bf16 autocast, fp32 weights + AdamW, one process): its tensor part is what
    # torch.cuda.max_memory_allocated measures (the CUDA context is outside it), next to the measured peak.
    predicted = cuda_peak(cfg, policy if kind == "ebt" else "none", args.batch, remat_chunk=chunk)
    row["predicted_cuda_tensors_mb"] = DEFAULT_CUDA.factor * predicted.tensors / 2**20
    row["predicted_cuda_peak_mb"] = predicted.total / 2**20
    if device.type == "cuda" and error is None:
        row["measured_over_predicted"] = row["peak_memory_mb"] / row["predicted_cuda_tensors_mb"]
    del model, optimizer, sharded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(parser, size="small", context=1024, vocab=50304)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long CPU check of this script")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.tiny:
        args.size, args.context, args.vocab, args.batch, args.steps, args.warmup = "4xs", 32, 256, 2, 1, 1
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = None
    if args.device == "cuda":
        try:
            from launch.metrics import CUDA_PEAK_BF16
        except ImportError:  # only torch is needed on the device machine
            CUDA_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in CUDA_PEAK_BF16.items() if k in name), None)
        torch.backends.cuda.matmul.allow_tf32 = True
    args.peak_flops = peak
    rows = [run_point(args, "transformer", "none", args.steps, args.warmup),
            run_point(args, "ebt", "none", args.steps, args.warmup)]
    print(json.dumps(rows[-1]), flush=True)
    for policy, chunk in (("block", 0), ("mcmc_step", 0), ("mcmc_step", max(1, args.batch // 4)),
                          ("block+mcmc_step", max(1, args.batch // 4))):
        rows.append(run_point(args, "ebt", policy, max(2, args.steps // 3), 1, chunk))
        print(json.dumps(rows[-1]), flush=True)
    for sharding in ("fsdp", "fsdp_regather"):
        rows.append(run_point(args, "ebt", "none", max(2, args.steps // 3), 1, sharding=sharding))
        print(json.dumps(rows[-1]), flush=True)
    payload = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "config": {k: v for k, v in vars(args).items()}, "results": rows}
    path = Path(args.out) / "gpu_step.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"{r['kind']:11s} {r['policy']:16s} chunk={r['remat_chunk']} {r['sharding'] or '':13s} "
              f"tokens/s={tps} MFU={mfu} "
              f"peak={r['peak_memory_mb']:.0f}MB {r['error'] or ''}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
