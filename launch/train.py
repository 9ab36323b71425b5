"""`ebt train` and `ebt export`, and `run_training(cfg)` for programmatic use (Slurm, eval, tests).

`ebt --help` imports this module to register the commands, so it imports only the standard library and
launch.signals at module level; launch.config and launch.resume (both load torch) are imported where used.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from launch.signals import PREEMPTED_EXIT_CODE

if TYPE_CHECKING:
    from launch.config import TrainConfig

# launch.resume.ALLOW_FLAG, spelled here so that registering the flag does not import launch.resume (and with it
# torch); tests/launch/test_cli_imports.py checks that the two agree.
ALLOW_FLAG = "--allow-schedule-change"
RESTART_FLAG = "--restart"  # launch.resume.RESTART_FLAG, likewise


def run_training(cfg: TrainConfig, log=None, allow_schedule_change: bool = False,
                 restart: bool = False) -> dict[str, Any]:
    """Train (resuming from the newest valid checkpoint in the run dir); returns the final metrics.

    Under torchrun / accelerate launch / srun each process calls this; it returns on every rank. Rank 0 holds
    the run dir's lock (launch/run_lock.py) throughout, the other ranks share it: a second trainer on the run
    dir is refused (RunLockedError) before it reads or writes anything there. A run that cannot start is refused
    by `preflight` before anything is written; a rank whose peer dies raises RankLostError (one line naming the
    lost rank) instead of the backend's traceback. A run that is already finished returns its final metrics with
    "already_finished": True, without building anything; a resume that changes the LR schedule is refused unless
    `allow_schedule_change` (launch/resume.py). `restart`: rank 0 moves the run dir aside (launch/resume.py
    move_aside, nothing is deleted) once the run is known to start, and the run trains from step 0.
    """
    import contextlib

    from launch.run_lock import run_lock

    rank0 = int(os.environ.get("RANK", "0")) == 0
    _check_runs_dir(cfg)  # the lock file goes into runs_dir: a runs_dir that cannot hold it is one line first
    with run_lock(cfg.run_dir) if rank0 else contextlib.nullcontext():
        return _run_locked(cfg, log, allow_schedule_change, restart, rank0)


def _run_locked(cfg: TrainConfig, log, allow_schedule_change: bool, restart: bool, rank0: bool) -> dict[str, Any]:
    from launch.distributed import lost_rank_error
    from launch.resume import check_resume, finished, move_aside, schedule_changes
    from launch.run_dir import keep_run_tokenizer
    from launch.trainer import Trainer

    # Under --restart no rank reads the old run: rank 0 moves it aside below (it may not verify at all).
    saved = None if restart else check_resume(cfg, int(os.environ.get("WORLD_SIZE", "1")), allow_schedule_change)
    done = None if restart else finished(cfg)
    if done is not None:
        return {"step": done["step"], "tokens": done["tokens"], "run_dir": str(cfg.run_dir), "preempted": False,
                "already_finished": True, "final_row": done,
                **{k: done[k] for k in ("val_loss", "val_ppl", "val_tokens") if k in done}}
    preflight(cfg)
    if restart and rank0:
        moved = move_aside(cfg.run_dir)
        if moved is not None:
            print(f"ebt train: --restart: moved {cfg.run_dir} to {moved}; training from step 0", file=sys.stderr)
    trainer = Trainer(cfg, log=log)
    finished_ok = False
    try:
        trainer.setup()
        if trainer.is_main:
            keep_run_tokenizer(cfg)  # <run dir>/tokenizer: generate and eval find it there (launch/run_dir.py)
        changes = schedule_changes(saved.config, cfg) if saved is not None else []
        if changes and trainer.step == saved.step:  # the LR follows cfg's values from here (launch/schedule.py)
            trainer.log("LR schedule changed on resume (--allow-schedule-change): "
                        + ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes))
        result = trainer.fit()
        finished_ok = True
    except RuntimeError as error:
        lost = lost_rank_error(error)  # asks the store who is left: before close() destroys the group
        if lost is None:
            raise
        raise lost from None
    finally:
        trainer.close(finished_ok)
    return result


# ---------------------------------------------------------------------------------------------- preflight


def preflight(cfg: TrainConfig, ranks_here: int | None = None) -> None:
    """Refuse, before any file is written, a run that cannot start: a runs_dir that cannot hold it, a model
    vocabulary that is not the tokenizer's, or a step predicted (planning) not to fit this machine's memory.
    `ranks_here`: the processes that will share this machine (default: LOCAL_WORLD_SIZE). Last, once the run can
    start, the data is prepared (a no-op once it is) and checked to serve both splits (_check_data)."""
    _check_runs_dir(cfg)
    _check_vocab(cfg)
    _check_memory(cfg, ranks_here)
    _check_data(cfg)


def _check_data(cfg: TrainConfig) -> None:
    """Prepare the data and refuse a run whose train or val split serves no window of
    model.architecture.context_length + 1 tokens. Validation first reads the val split at the first evaluation, by
    default after the last step, so an empty one (data.source a single .txt file: one document) failed a run that
    had trained every step (issue 21).
    A source that leaves a split empty is refused before anything is prepared for it (require_splits); prepared
    shards are checked from their manifest, so a read-only cache that holds them serves as it is."""
    import dataclasses

    from data_pipeline import check_splits, prepare_if_needed

    # Progress from the first rank only, as Trainer.setup_data does; every rank prepares under the data lock.
    progress = cfg.data.progress and int(os.environ.get("RANK", "0")) == 0
    prepare_if_needed(dataclasses.replace(cfg.data, progress=progress), require_splits=True)
    check_splits(cfg.data, cfg.model.architecture.context_length)


def _check_runs_dir(cfg: TrainConfig) -> None:
    import tempfile
    from pathlib import Path

    runs, run_dir = Path(cfg.runs_dir), cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"config key 'name': {run_dir} exists and is not a directory (runs_dir={cfg.runs_dir})")
    probe = run_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = f"{runs} is not a directory" if probe == runs else f"{probe} is not a directory"
        raise ValueError(f"config key 'runs_dir': cannot hold runs: {what}")
    try:  # creating and removing a directory is the only sure test (root may write anywhere but in /proc)
        os.rmdir(tempfile.mkdtemp(prefix=".ebt-write-test-", dir=probe))
    except OSError as error:
        raise ValueError(f"config key 'runs_dir': cannot create {runs}: {error.strerror or error} "
                         f"(in {probe})") from None


def _check_vocab(cfg: TrainConfig) -> None:
    from data_pipeline.tokenizer import load_meta, tokenizer_exists

    data = cfg.data
    if data.tokenizer and tokenizer_exists(data.tokenizer):
        vocab, where = load_meta(data.tokenizer).vocab_size, f"the tokenizer {data.tokenizer}"
    else:
        vocab, where = data.vocab_size, "the tokenizer (data.vocab_size)"
    if cfg.model.architecture.vocab_size != vocab:
        raise ValueError(f"config key 'model.architecture.vocab_size': {cfg.model.architecture.vocab_size} differs "
                         f"from the {vocab} pieces of {where}; leave model.architecture.vocab_size unset to follow the "
                         "tokenizer")


def _planning_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _check_memory(cfg: TrainConfig, ranks_here: int | None) -> None:
    """An explicit checkpointing policy at trainer.micro_batch_size must fit the machine (auto plans its own
    micro-batch and refuses by itself). Only the clearly impossible is refused: the prediction is compared with
    all the memory available, not with a budget, and bf16 activations are counted at 2 bytes."""
    if cfg.trainer.checkpointing == "auto" or cfg.distributed.strategy != "ddp":
        return  # ZeRO shards the optimizer state, which the planner counts whole
    import planning
    from launch.distributed import resolve_precision

    device = _planning_device()
    ranks = 1 if device.type == "cuda" else max(1, ranks_here or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        precision = resolve_precision(cfg.trainer.precision, device.type == "cuda")
        dtype_bytes = 2 if precision == "bf16" else 4
        predicted = planning.predict_peak_bytes(cfg.model, cfg.trainer.checkpointing, cfg.trainer.micro_batch_size,
                                                device, dtype_bytes=dtype_bytes, remat_chunk=cfg.trainer.remat_chunk)
        available = planning.device_capacity_bytes(device) / ranks
    except Exception:  # noqa: BLE001 - a config the planner cannot model is left to the run itself
        return
    if predicted > available:
        where = f"{device.type} memory" + (f" per rank ({ranks} ranks on this machine)" if ranks > 1 else "")
        raise ValueError(
            "config key 'model.architecture.context_length': a training step at context length "
            f"{cfg.model.architecture.context_length} "
            f"with micro-batch {cfg.trainer.micro_batch_size} (trainer.micro_batch_size) is predicted to peak at "
            f"{predicted / 1e9:,.1f} GB (planning, checkpointing {cfg.trainer.checkpointing}), but only "
            f"{available / 1e9:,.1f} GB of {where} is available; lower model.architecture.context_length or "
            "trainer.micro_batch_size, or set trainer.checkpointing=auto to recompute and split the batch")


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
    if args.allow_schedule_change:
        cmd.append(ALLOW_FLAG)
    if args.restart:
        cmd.append(RESTART_FLAG)
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
    from launch.config import load_config
    from launch.resume import check_resume, final_line, finished

    if args.nproc < 1:
        raise ValueError(f"--nproc: must be >= 1, got {args.nproc}")
    configs = [c for c in args.configs if c.endswith((".yaml", ".yml")) or "=" not in c]
    overrides = [c for c in args.configs if c not in configs]
    if not configs:
        raise ValueError("no config file given: ebt train CONFIG.yaml [key=value ...]")
    args.configs, args.overrides = configs, overrides
    cfg = load_config(configs, overrides)
    local = args.nproc > 1 and "WORLD_SIZE" not in os.environ
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        # A run dir another trainer holds is refused as such first (not for its half-written state), and by the
        # --nproc launcher before it starts ranks that would wait for a refused rank 0 (launch/run_lock.py).
        from launch.run_lock import check_not_running

        check_not_running(cfg.run_dir)
    # A finished run, or a resume that would not continue the saved run, is settled here: before re-executing
    # with another allocator and before any rank starts, so a re-run of a finished run takes seconds. --restart
    # starts over whatever the run dir holds.
    if not args.restart:
        check_resume(cfg, args.nproc if local else int(os.environ.get("WORLD_SIZE", "1")),
                     args.allow_schedule_change)
    done = None if args.restart else finished(cfg)
    if done is not None:
        if rank0:
            _print_finished(cfg, done)
        return 0
    note = _use_configured_cpu_allocator(cfg) if getattr(args, "from_command_line", False) else None
    # Before the note and before any rank starts: a run that cannot start is one line (run_training checks
    # again, which costs little: the planner's trace is cached).
    preflight(cfg, ranks_here=args.nproc if local else None)
    if note:
        print(note, file=sys.stderr)
    if local:
        print(_global_batch_note(cfg, args.nproc), file=sys.stderr)
        return _launch_local_processes(args)
    result = run_training(cfg, allow_schedule_change=args.allow_schedule_change, restart=args.restart)
    if result["preempted"]:
        return PREEMPTED_EXIT_CODE
    if rank0:
        if result.get("already_finished"):  # finished by another launch between the check above and here
            _print_finished(cfg, result["final_row"])
            return 0
        print(final_line(result) if result.get("val_ppl") is not None else "training finished")
        print(f"run dir: {result['run_dir']}")
    return 0


def _print_finished(cfg: TrainConfig, row: dict[str, Any]) -> None:
    from launch.resume import final_line

    print(f"{cfg.run_dir} is already finished (step {row['step']}, trainer.max_steps={cfg.trainer.max_steps}): "
          f"nothing to train or evaluate. To train it further raise trainer.max_steps and pass {ALLOW_FLAG}; "
          "for a new run pick a new name=.")
    print(final_line(row))
    print(f"run dir: {cfg.run_dir}")


def _global_batch_note(cfg: TrainConfig, nproc: int) -> str:
    """--nproc N runs N copies of the config, and trainer.micro_batch_size is per process: say what that makes."""
    t = cfg.trainer
    one = t.micro_batch_size * t.grad_accum_steps
    hint = (f"; for the config's global batch of {one} set trainer.micro_batch_size={t.micro_batch_size // nproc}"
            if t.micro_batch_size % nproc == 0 else "")
    return (f"ebt train: --nproc {nproc}: trainer.micro_batch_size={t.micro_batch_size} is per process, so a step "
            f"takes {nproc} x {t.micro_batch_size} x {t.grad_accum_steps} (grad_accum_steps) = {nproc * one} "
            f"sequences of {cfg.model.architecture.context_length} tokens, {nproc}x the batch of one process{hint}")


def _use_configured_cpu_allocator(cfg: TrainConfig) -> str | None:
    """CPU training runs on trainer.cpu_allocator (tcmalloc when installed): re-execute with it preloaded.
    Returns the note to print when training falls back to the C library's allocator (the caller prints it
    once the run is known to start, so that a refused run prints only its error)."""
    import torch

    from launch.allocator import effective_choice, reexec_with, resolve

    if torch.cuda.is_available():
        return None
    choice = effective_choice(cfg.trainer.cpu_allocator)
    name, path = resolve(choice)
    note = None
    if path is None and choice == "auto" and int(os.environ.get("RANK", "0")) == 0 \
            and not os.environ.get("EBT_ALLOCATOR_NOTED"):
        os.environ["EBT_ALLOCATOR_NOTED"] = "1"  # once per launch, not once per rank
        note = ("ebt train: note: neither tcmalloc nor jemalloc is installed (Debian/Ubuntu: apt install "
                "libtcmalloc-minimal4); training on the C library's allocator, whose heap fragments: expect up "
                "to 50% more peak memory and ~10% slower steps on CPU")
    reexec_with(name, path)
    return note


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launch.checkpoint import export_model, resolve_checkpoint
    from launch.run_dir import KEPT_DIR, find_tokenizer

    out = export_model(args.checkpoint, args.out, force=args.force)
    if (Path(out) / KEPT_DIR).is_dir():
        print(f"exported {out}/model.safetensors, {out}/config.yaml and {out}/{KEPT_DIR}/")
        return 0
    print(f"exported {out}/model.safetensors and {out}/config.yaml")
    try:  # say why the tokenizer is not there: the same search that export_model's copy tried
        find_tokenizer(resolve_checkpoint(args.checkpoint))
    except (ValueError, FileNotFoundError) as error:
        print(f"ebt export: note: no tokenizer exported ({error}); `ebt generate` and `ebt eval` on {out} then "
              "need --tokenizer", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an EBT or Transformer++ (resumes automatically)",
                              description="Train from YAML config(s) with key=value overrides. Launch several "
                              "processes with torchrun, accelerate launch, srun or --nproc.")
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml|key=value",
                   help="config YAML file(s), merged in order, then key=value overrides")
    p.add_argument("--nproc", type=int, default=1,
                   help="local processes (gloo on CPU, nccl on GPU); trainer.micro_batch_size is per process, so "
                        "N processes train on N times the global batch of one")
    p.add_argument(ALLOW_FLAG, dest="allow_schedule_change", action="store_true",
                   help="resume even though trainer.max_steps, optim.warmup_steps, optim.min_lr_scale or optim.lr "
                        "changed: the LR schedule then follows the new values from the resumed step on")
    p.add_argument(RESTART_FLAG, dest="restart", action="store_true",
                   help="start the run over: move its run dir aside to <run dir>.old-<time> (nothing is deleted) "
                        "and train from step 0; for one launch only, not in a script that Slurm requeues")
    p.set_defaults(func=_train)

    e = subparsers.add_parser("export", help="write safetensors weights + config.yaml from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint dir, or a run dir (its newest valid checkpoint)")
    e.add_argument("out", help="output directory: new, empty, or (with --force) a previous export")
    e.add_argument("--force", action="store_true",
                   help="replace OUT when it holds a previous `ebt export` (never a directory of other files)")
    e.set_defaults(func=_export)


__all__ = ["PREEMPTED_EXIT_CODE", "preflight", "register", "run_training"]
