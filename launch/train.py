"""`ebt train` and `ebt export`, and `run_training(cfg)` for programmatic use (Slurm, eval, tests)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from launch.config import TrainConfig, load_config
from launch.signals import PREEMPTED_EXIT_CODE


def run_training(cfg: TrainConfig, log=None) -> dict[str, Any]:
    """Train (resuming from the newest valid checkpoint in the run dir); returns the final metrics.

    Under torchrun / accelerate launch / srun each process calls this; it returns on every rank.
    """
    from launch.trainer import Trainer

    trainer = Trainer(cfg, log=log)
    finished = False
    try:
        trainer.setup()
        result = trainer.fit()
        finished = True
    finally:
        trainer.close(finished)
    return result


def _launch_local_processes(args: argparse.Namespace) -> int:
    """`--nproc N` on one machine: N copies of this command with the torch.distributed variables set.

    Not torchrun: its agent turns every worker exit code into 1, which would hide PREEMPTED_EXIT_CODE from a
    scheduler. Here preemption signals are forwarded to every rank and the ranks' own codes are returned.
    """
    import signal
    import socket

    from launch.signals import PREEMPTION_SIGNALS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "launch.cli", "train", *args.configs, *args.overrides]
    procs = []
    for rank in range(args.nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(args.nproc),
                   RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(args.nproc))
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if all(code == PREEMPTED_EXIT_CODE for code in codes):
        return PREEMPTED_EXIT_CODE
    return next((code for code in codes if code != 0), 0)


def _train(args: argparse.Namespace) -> int:
    configs = [c for c in args.configs if c.endswith((".yaml", ".yml")) or "=" not in c]
    overrides = [c for c in args.configs if c not in configs]
    if not configs:
        raise ValueError("no config file given: ebt train CONFIG.yaml [key=value ...]")
    args.configs, args.overrides = configs, overrides
    cfg = load_config(configs, overrides)
    if getattr(args, "from_command_line", False):
        _use_configured_cpu_allocator(cfg)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_local_processes(args)
    result = run_training(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if result["preempted"]:
        return PREEMPTED_EXIT_CODE
    if rank0:
        ppl = result.get("val_ppl")
        print(f"validation perplexity: {ppl:.3f} (loss {result['val_loss']:.4f}) after {result['step']} steps, "
              f"{result['tokens']:,} tokens" if ppl is not None else "training finished")
        print(f"run dir: {result['run_dir']}")
    return 0


def _use_configured_cpu_allocator(cfg: TrainConfig) -> None:
    """CPU training runs on trainer.cpu_allocator (tcmalloc when installed): re-execute with it preloaded."""
    import torch

    from launch.allocator import effective_choice, reexec_with, resolve

    if torch.cuda.is_available():
        return
    choice = effective_choice(cfg.trainer.cpu_allocator)
    name, path = resolve(choice)
    if path is None and choice == "auto" and int(os.environ.get("RANK", "0")) == 0 \
            and not os.environ.get("EBT_ALLOCATOR_NOTED"):
        os.environ["EBT_ALLOCATOR_NOTED"] = "1"  # once per launch, not once per rank
        print("ebt train: note: neither tcmalloc nor jemalloc is installed (Debian/Ubuntu: apt install "
              "libtcmalloc-minimal4); training on the C library's allocator, whose heap fragments: expect up to "
              "50% more peak memory and ~10% slower steps on CPU", file=sys.stderr)
    reexec_with(name, path)


def _export(args: argparse.Namespace) -> int:
    from launch.checkpoint import export_model

    out = export_model(args.checkpoint, args.out)
    print(f"exported {out}/model.safetensors and {out}/config.yaml")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an EBT or Transformer++ (resumes automatically)",
                              description="Train from YAML config(s) with key=value overrides. Launch several "
                              "processes with torchrun, accelerate launch, srun or --nproc.")
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="config YAML file(s), merged in order, then key=value overrides")
    p.add_argument("--nproc", type=int, default=1, help="local processes (gloo on CPU, nccl on GPU)")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("export", help="write safetensors weights + config.yaml from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint dir, or a run dir (its newest valid checkpoint)")
    e.add_argument("out", help="output directory")
    e.set_defaults(func=_export)


__all__ = ["PREEMPTED_EXIT_CODE", "register", "run_training"]
