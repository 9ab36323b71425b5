"""What a checkpoint costs each rank, before and after issue 22, in one run: W gloo ranks on CPU, each holding
synthetic state that stands for its shard, saved and resumed through the project's CheckpointManager.

Per rank it measures the time a save blocks the rank, the bytes read by syscalls (/proc/self/io rchar: page-cache
hits count, so this is what the filesystem would be asked for) and the time from launch to a loaded state on
resume, as `ebt train` does it: the pre-check of the newest checkpoint (launch.resume._verified) on every rank,
then the trainer's choice of checkpoint (rank 0 alone before, every rank on its own files after), then loading
this rank's files. The shard is written as one file per rank, named as DCP names its files (__<rank>_0.distcp),
so the ownership rules see what they would under fsdp; DCP's own planning and metadata are not part of it.

The fsdp save path itself (trees that have launch.fsdp.stage_sharded) is measured apart: a stack of Linear layers
sharded by FSDP2 with AdamW state, about the same bytes per rank, saved through CheckpointManager as
FSDPStrategy.save_parts has it saved: synchronously (launch.fsdp.save_sharded, what the rank waits for with
checkpoint.async_save off) and in the background (stage_sharded now, write_staged in the writer thread), in
alternating rounds, so the stall ratio comes from one run under one load.

From these it fits a per-byte cost (hash and write throughput on this machine) and extrapolates to the paper
ladder's large (2 nodes x 8 GPUs) and xl (4 x 8) at a stated filesystem bandwidth: the preemption save against
slurm's signal_delay_s (120 s) and the bytes and time before the first step after a requeue.

    python -m benchmarks.checkpoint_scale --baseline-tree /tmp/before     # before/after, W = 2 and 4

`--model-build` measures instead the peak host memory of building the model under distributed.strategy=fsdp (the
trainer's route: FSDPStrategy.build_model then parallelize) on W gloo ranks, before (every rank builds the whole
model on CPU, then shards it) and after (built on meta, only this rank's shard materialised: launch/meta_init.py),
both routes in this tree, for a size of configs/model/ (medium by default):

    python -m benchmarks.checkpoint_scale --model-build --world 2
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]

# Paper ladder state per model (weights fp32 + AdamW's two moments = 12 bytes per parameter) and its ranks.
LADDER = {"large": {"params": 0.44e9, "ranks": 16}, "xl": {"params": 0.84e9, "ranks": 32}}
SIGNAL_DELAY_S = 120  # slurm spec default: the warning before a preemption's SIGKILL


def _io() -> tuple[int, int]:
    """(rchar, read_bytes): bytes read by syscalls (page-cache hits included), and from storage."""
    with open("/proc/self/io") as io:
        fields = dict(line.split(": ") for line in io.read().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


def _evict(root: Path) -> None:
    """Drop the checkpoint's pages from the page cache (they are clean after the save's fsync), so read_bytes
    counts what a restarted job on another node would read from the filesystem."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(args: argparse.Namespace) -> None:
    """One rank (run from another tree's PYTHONPATH for the baseline): save twice, then resume, and print JSON."""
    import torch
    import torch.distributed as dist

    from launch import resume
    from launch.checkpoint import CheckpointManager

    load = getattr(__import__("launch.checkpoint", fromlist=["x"]), "load_pt", None)
    if load is None:
        from launch.checkpoint import _load_pt as load

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    shard = torch.randn(int(args.shard_mb * 2**20 / 4))  # this rank's model + optimizer shard stand-in
    per_rank = {"rng": torch.get_rng_state(), "data": {"epoch": 0, "offset": rank}}
    root = Path(args.run_dir) / "checkpoints"

    def all_sum(values: list[float]) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def gather(obj):
        box = [None] * world
        dist.all_gather_object(box, obj)
        return box

    manager = CheckpointManager(root, keep_last=2, rank=rank, world_size=world, barrier=dist.barrier,
                                log=lambda line: None, all_sum=all_sum)

    def sharded_save(directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        torch.save({"shard": shard}, directory / f"__{rank}_0.distcp")
        if rank == 0:
            (directory / ".metadata").write_bytes(b"{}")

    save_s = []
    for step in (1, 2):  # the first warms the allocator and the filesystem; both are reported
        dist.barrier()
        start = time.perf_counter()
        manager.save(step, {"trainer": {"step": step}} if rank == 0 else {}, per_rank, "model: {}\n",
                     sharded_save=sharded_save)
        save_s.append(time.perf_counter() - start)
    dist.barrier()
    stall_s = stage_s = end_to_end_s = None
    if "background" in inspect.signature(CheckpointManager.__init__).parameters:  # async saves (after)
        from launch.async_save import BackgroundSaver

        group = dist.new_group(backend="gloo")

        def group_sum(values: list[float]) -> list[float]:
            total = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(total, group=group)
            return total.tolist()

        background = CheckpointManager(Path(args.run_dir) / "async-checkpoints", keep_last=3, rank=rank,
                                       world_size=world, barrier=dist.barrier,
                                       log=lambda line: None, all_sum=all_sum, background=BackgroundSaver(),
                                       background_collectives=(lambda: dist.barrier(group=group), group_sum))
        dist.barrier()
        start = time.perf_counter()
        background.save(3, {"trainer": {"step": 3}} if rank == 0 else {}, {**per_rank, "shard": shard}, "model: {}\n")
        stall_s, stage_s = time.perf_counter() - start, background.last_stage_s
        background.wait()
        end_to_end_s = time.perf_counter() - start
        dist.barrier()
    fsdp = _fsdp_saves(args, Path(args.run_dir), rank, world, all_sum)
    own = [root / "step_2" / f"rank_{rank}.pt", root / "step_2" / "dcp" / f"__{rank}_0.distcp"]
    own_bytes = sum(path.stat().st_size for path in own)

    # Resume as `ebt train` does it in this tree.
    _evict(root)
    dist.barrier()
    (read0, storage0), start = _io(), time.perf_counter()
    assert resume._verified(root / "step_2")
    if "gather" in inspect.signature(manager.latest_valid).parameters:
        chosen = manager.latest_valid(gather=gather)
    else:
        box = [manager.latest_valid() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
    verify_s, verify_read = time.perf_counter() - start, _io()[0] - read0
    for path in own:
        load(path)
    resume_s, (read1, storage1) = time.perf_counter() - start, _io()
    resume_read, storage_read = read1 - read0, storage1 - storage0
    assert chosen == root / "step_2"
    print(json.dumps({"rank": rank, "world": world, "save_s": save_s, "own_bytes": own_bytes,
                      "async_stall_s": stall_s, "async_stage_s": stage_s, "async_end_to_end_s": end_to_end_s,
                      "verify_s": verify_s, "verify_read": verify_read, "resume_s": resume_s,
                      "resume_read": resume_read, "resume_storage_read": storage_read, "fsdp": fsdp}), flush=True)
    dist.destroy_process_group()


def _fsdp_saves(args: argparse.Namespace, run_dir: Path, rank: int, world: int, all_sum) -> dict | None:
    """The fsdp strategy's DCP save, synchronous against background, `args.rounds` alternating rounds after one
    warm-up of each: the seconds each blocked this rank (sync: the whole save; async: the stall until training may
    go on, and its staging), and the async save's end to end. None on a tree without background DCP saves."""
    import statistics

    import torch
    import torch.distributed as dist

    from launch.checkpoint import CheckpointManager

    try:
        from launch import fsdp as fsdp_module
    except ImportError:  # a tree from before fsdp
        return None
    if not hasattr(fsdp_module, "stage_sharded"):
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from launch.async_save import BackgroundSaver

    dim = 1024
    # 12 bytes per parameter of this rank's shard (fp32 weights + AdamW's two moments), as the synthetic shard.
    layers = max(1, round(args.shard_mb * 2**20 * world / 12 / (dim * dim + dim)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(dim, dim) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, dim)).sum().backward()
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after the first step
    optimizer.zero_grad()
    group = dist.new_group(backend="gloo")

    def group_sum(values: list[float]) -> list[float]:
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=group)
        return total.tolist()

    sync = CheckpointManager(run_dir / "fsdp-sync", keep_last=1, rank=rank, world_size=world, barrier=dist.barrier,
                             log=lambda line: None, all_sum=all_sum)
    background = CheckpointManager(run_dir / "fsdp-async", keep_last=1, rank=rank, world_size=world,
                                   barrier=dist.barrier, log=lambda line: None, all_sum=all_sum,
                                   background=BackgroundSaver(),
                                   background_collectives=(lambda: dist.barrier(group=group), group_sum),
                                   background_group=group)
    per_rank = {"rng": torch.get_rng_state()}

    def sharded_save(directory: Path) -> None:
        fsdp_module.save_sharded(directory, model, optimizer)

    def sharded_stage():
        staged = fsdp_module.stage_sharded(model, optimizer)
        return lambda directory, process_group: fsdp_module.write_staged(directory, staged, process_group)

    sync_s, stall_s, stage_s, end_to_end_s = [], [], [], []
    for step in range(args.rounds + 1):  # round 0 warms both paths up and is not reported
        shared = {"trainer": {"step": step}} if rank == 0 else {}
        dist.barrier()
        start = time.perf_counter()
        sync.save(step, shared, per_rank, "model: {}\n", sharded_save=sharded_save)
        blocked = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        background.save(step, shared, per_rank, "model: {}\n", sharded_save=sharded_save,
                        sharded_stage=sharded_stage)
        stalled = time.perf_counter() - start
        background.wait()
        whole = time.perf_counter() - start
        if step:
            sync_s.append(blocked)
            stall_s.append(stalled)
            stage_s.append(background.last_stage_s)
            end_to_end_s.append(whole)
    dist.barrier()
    state_mb = sum(path.stat().st_size for path in (run_dir / "fsdp-sync").rglob(f"__{rank}_*.distcp")) / 2**20
    return {"layers": layers, "dim": dim, "dcp_mb": state_mb, "sync_s": statistics.median(sync_s),
            "stall_s": statistics.median(stall_s), "stage_s": statistics.median(stage_s),
            "end_to_end_s": statistics.median(end_to_end_s), "rounds": args.rounds}


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def build_worker(args: argparse.Namespace) -> None:
    """One rank: build the model as FSDPStrategy does in this tree, by `args.mode` (cpu: the whole model, then
    sharded, the route before issue 22; meta: launch/meta_init.py's), and print its peak host memory as JSON."""
    import gc
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ebt import build_model
    from launch.config import load_config
    from launch.fsdp import local_tensor, model_blocks
    from launch.strategies import FSDPStrategy
    from launch.trainer import seed_everything

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    accelerator = SimpleNamespace(device=torch.device("cpu"), mixed_precision="no")
    # Warm-up: the same route on a tiny model first, so the code it loads (FSDP, the dispatch modes) and the
    # allocator's first arenas are not counted as the build's memory.
    tiny = load_config([], ["distributed.strategy=fsdp", "model.architecture.dim=32", "model.architecture.n_layers=2",
                            "model.architecture.n_heads=2"])
    for mode in ("cpu", "meta"):
        warm = FSDPStrategy(tiny, accelerator, rank, world)
        warm.parallelize(warm.build_model(lambda: build_model(tiny.model)) if mode == "meta"
                         else build_model(tiny.model))
    del warm
    cfg = load_config([REPO / "configs" / "model" / f"{args.size}.yaml"], ["distributed.strategy=fsdp"])
    strategy = FSDPStrategy(cfg, accelerator, rank, world)
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS: the peak below is the build's own
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    seed_everything(cfg.trainer.seed)
    if args.mode == "meta":
        model = strategy.build_model(lambda: build_model(cfg.model))
    else:
        model = build_model(cfg.model)
    strategy.parallelize(model)
    seconds = time.perf_counter() - start
    gc.collect()
    peak, held = _rss_kib("VmHWM") - before, _rss_kib("VmRSS") - before
    params = list(model.parameters())
    full = sum(p.numel() * p.element_size() for p in params)  # a DTensor's numel is the whole tensor's
    local = sum(local_tensor(p).numel() * p.element_size() for p in params)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model_blocks(model))
    print(json.dumps({"rank": rank, "world": world, "mode": args.mode, "seconds": seconds, "peak_bytes": peak * 1024,
                      "held_bytes": held * 1024, "full_bytes": full, "local_bytes": local, "block_bytes": block}),
          flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(tree: Path, world: int, shard_mb: float, rounds: int = 3, worker_args: list[str] | None = None,
              env: dict[str, str] | None = None) -> list[dict]:
    """W worker processes on `tree`'s packages; their JSON lines, by rank."""
    with tempfile.TemporaryDirectory(prefix="ebt-ckpt-scale-") as run_dir:
        env = {**os.environ, "PYTHONPATH": str(tree), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **(env or {})}
        extra = worker_args or ["--run-dir", run_dir, "--shard-mb", str(shard_mb), "--rounds", str(rounds)]
        procs = [subprocess.Popen([sys.executable, str(HERE), "--worker", *extra], cwd=tree,
                                  env={**env, "RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed on {tree}:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda row: row["rank"])


def throughput(shard_mb: float) -> dict:
    """sha256 and write throughput on this machine (bytes/s), the per-byte costs of the model."""
    data = os.urandom(int(shard_mb * 2**20))
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    hash_bps = len(data) / (time.perf_counter() - start)
    with tempfile.NamedTemporaryFile() as f:
        start = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        write_bps = len(data) / (time.perf_counter() - start)
    return {"hash_bytes_per_s": hash_bps, "write_bytes_per_s": write_bps}


def extrapolate(costs: dict, fs_gbps_per_rank: float, fs_gbps_total: float) -> list[dict]:
    """Save on the preemption path and time to first step after a requeue, before and after, per ladder size.

    Per rank state = 12 bytes/parameter / ranks. Before: the save waits for rank 0 to read back and hash the whole
    checkpoint; a restart has every rank read the whole checkpoint (the pre-check), and rank 0 once more.
    After: each rank hashes what it wrote while writing it (its own files), and reads back only its own files.
    A read is bounded by the slower of hashing and the filesystem (per client, and in aggregate)."""
    hash_bps = costs["hash_bytes_per_s"]
    rows = []
    for name, size in LADDER.items():
        ranks, total = size["ranks"], 12 * size["params"]
        own = total / ranks
        client, aggregate = fs_gbps_per_rank * 1e9, fs_gbps_total * 1e9
        write = max(own / client, total / aggregate)  # every rank writes its shard at once

        def read_hash(per_rank_bytes: float, readers: int, client=client, aggregate=aggregate) -> float:
            return max(per_rank_bytes / min(hash_bps, client), readers * per_rank_bytes / aggregate)

        before_save = write + read_hash(total, 1)  # + rank 0 hashing everything on the critical path
        after_save = write + read_hash(own, ranks)  # own files, in parallel (DCP's are read back, ours are not)
        before_resume = read_hash(total, ranks) + read_hash(total, 1) + read_hash(own, ranks)
        after_resume = read_hash(own, ranks) + read_hash(own, ranks)  # verify own, then load own
        rows.append({"size": name, "ranks": ranks, "checkpoint_gb": total / 1e9, "per_rank_gb": own / 1e9,
                     "save_before_s": before_save, "save_after_s": after_save,
                     "resume_read_before_tb": (ranks + 1) * total / 1e12 + total / 1e12,
                     "resume_read_after_gb": 2 * total / 1e9,
                     "resume_before_s": before_resume, "resume_after_s": after_resume,
                     "save_after_margin": SIGNAL_DELAY_S / after_save})
    return rows


def table(payload: dict) -> str:
    lines = ["## Checkpoints at scale (`python -m benchmarks.checkpoint_scale --baseline-tree DIR`): before = the tree "
             "before issue 22, after = this one", "",
             f"W gloo ranks on CPU, {payload['shard_mb']} MB shard per rank, load {payload['load']:.2f}, "
             f"{payload['date']}. Resume = the pre-check, the choice of checkpoint and loading this rank's files; "
             "read = bytes read by syscalls (rchar), from storage = read_bytes after evicting the checkpoint "
             "from the page cache (the most of any rank).", "",
             "| W | tree | save s (rank 0 / max) | async: stall / staging / end-to-end s (max) "
             "| resume read per rank (MB) | from storage (MB) | own files (MB) | resume s (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for world, trees in payload["measured"].items():
        for tree, rows in trees.items():
            stall = ("n/a (no async saves)" if rows[0]["async_stall_s"] is None else
                     f"{max(r['async_stall_s'] for r in rows):.3f} / {max(r['async_stage_s'] for r in rows):.3f} / "
                     f"{max(r['async_end_to_end_s'] for r in rows):.2f}")
            lines.append(f"| {world} | {tree} | {rows[0]['save_s'][-1]:.2f} / {max(r['save_s'][-1] for r in rows):.2f}"
                         f" | {stall}"
                         f" | {max(r['resume_read'] for r in rows) / 2**20:,.0f}"
                         f" | {max(r['resume_storage_read'] for r in rows) / 2**20:,.0f}"
                         f" | {rows[0]['own_bytes'] / 2**20:,.0f} | {max(r['resume_s'] for r in rows):.2f} |")
    fsdp_rows = [(world, rows) for world, trees in payload["measured"].items()
                 for tree, rows in trees.items() if tree == "after" and rows[0].get("fsdp")]
    if fsdp_rows:
        first = fsdp_rows[0][1][0]["fsdp"]
        linear = f"Linear({first['dim']}, {first['dim']})"
        lines += ["", f"fsdp's own save path (FSDP2 over {first['layers']} {linear} layers with AdamW state, DCP "
                  "files; the tree after): seconds a save blocks the rank with "
                  "checkpoint.async_save off (the whole save) and on (staging into host memory; the DCP write, "
                  f"hashes and rename go on in the background), median of {first['rounds']} alternating rounds, "
                  "the most of any rank; same run, same load as above.", "",
                  "| W | DCP MB per rank | sync save s | async stall s | of which staging s | async end-to-end s "
                  "| stall / sync |", "|---|---|---|---|---|---|---|"]
        for world, rows in fsdp_rows:
            sync, stall = max(r["fsdp"]["sync_s"] for r in rows), max(r["fsdp"]["stall_s"] for r in rows)
            lines.append(f"| {world} | {rows[0]['fsdp']['dcp_mb']:.0f} | {sync:.3f} | {stall:.3f} | "
                         f"{max(r['fsdp']['stage_s'] for r in rows):.3f} | "
                         f"{max(r['fsdp']['end_to_end_s'] for r in rows):.3f} | {stall / sync:.2f}x |")
    costs = payload["costs"]
    lines += ["", f"Extrapolated (sha256 {costs['hash_bytes_per_s'] / 1e9:.2f} GB/s measured here; filesystem "
              f"{payload['fs_gbps_per_rank']} GB/s per rank, {payload['fs_gbps_total']} GB/s aggregate; 12 bytes "
              "per parameter of weights and AdamW state):", "",
              "| size | ranks | checkpoint GB | save before s | save after s | margin vs 120 s | "
              "resume read before | resume read after | resume before s | resume after s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in payload["extrapolated"]:
        lines.append(f"| {row['size']} | {row['ranks']} | {row['checkpoint_gb']:.1f} | {row['save_before_s']:.1f} | "
                     f"{row['save_after_s']:.1f} | {row['save_after_margin']:.1f}x | "
                     f"{row['resume_read_before_tb']:.2f} TB | {row['resume_read_after_gb']:.0f} GB | "
                     f"{row['resume_before_s']:.0f} | {row['resume_after_s']:.1f} |")
    return "\n".join(lines)


def build_table(payload: dict) -> str:
    """The --model-build measurement as the README's table."""
    lines = [f"### FSDP model build (`python -m benchmarks.checkpoint_scale --model-build`): {payload['size']}, "
             f"{payload['world']} gloo ranks on CPU", "",
             f"Load {payload['load']:.2f} before, {payload['date']}, allocator {payload['allocator']}. "
             "Peak = VmHWM during FSDPStrategy.build_model + parallelize minus the RSS before it (the most of any "
             "rank); held = RSS after it. before = every rank builds the whole model on CPU then shards it; "
             "after = built on meta, each rank materialises its shard "
             "(launch/meta_init.py). Acceptance (issue 22): after's peak <= full / W + one block.", "",
             "| route | full model MiB | one block MiB | peak MiB (max rank) | peak / full | (full / W + block) / full "
             "| held MiB | build s (max) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, label in (("cpu", "before"), ("meta", "after")):
        rows = payload["measured"][mode]
        full, block, world = rows[0]["full_bytes"], rows[0]["block_bytes"], rows[0]["world"]
        peak = max(r["peak_bytes"] for r in rows)
        lines.append(f"| {label} | {full / 2**20:,.0f} | {block / 2**20:,.1f} | {peak / 2**20:,.0f} | "
                     f"{peak / full:.3f} | {(full / world + block) / full:.3f} | "
                     f"{max(r['held_bytes'] for r in rows) / 2**20:,.0f} | {max(r['seconds'] for r in rows):.1f} |")
    return "\n".join(lines)


def model_build(args: argparse.Namespace) -> None:
    """--model-build: both routes at each W, written to the README under checkpoint_scale's section."""
    from benchmarks.common import write_results
    from launch.allocator import preload_env, resolve

    # The allocator `ebt train` runs under (trainer.cpu_allocator=auto: tcmalloc where installed), or glibc's.
    allocator, library = resolve(args.allocator)
    env = preload_env(library, {}) if library else {}
    for world in args.world:
        load = os.getloadavg()[0]
        measured = {mode: run_world(REPO, world, 0, worker_args=["--model-build", "--mode", mode, "--size", args.size],
                                    env=env) for mode in ("cpu", "meta")}
        payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": load, "size": args.size, "world": world,
                   "allocator": allocator, "measured": measured}
        text = build_table(payload)
        write_results("checkpoint_scale_build" + ("" if args.allocator == "auto" else f"_{allocator}"), payload, text)
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--shard-mb", type=float, default=64.0)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3, help="fsdp sync/async save rounds (after a warm-up)")
    parser.add_argument("--baseline-tree", type=Path, help="a checkout before issue 22 (git worktree add ...)")
    parser.add_argument("--fs-gbps-per-rank", type=float, default=1.0)
    parser.add_argument("--fs-gbps-total", type=float, default=20.0)
    parser.add_argument("--model-build", action="store_true", help="measure the fsdp model build's peak memory")
    parser.add_argument("--mode", choices=("cpu", "meta"), help=argparse.SUPPRESS)
    parser.add_argument("--size", default="medium", help="configs/model/<size>.yaml for --model-build")
    parser.add_argument("--allocator", choices=("auto", "system"), default="auto",
                        help="--model-build's host allocator: ebt train's (auto) or glibc's (system)")
    args = parser.parse_args()
    if args.worker:
        if args.model_build:
            build_worker(args)
        else:
            worker(args)
        return
    sys.path.insert(0, str(REPO))
    if args.model_build:
        model_build(args)
        return
    from benchmarks.common import write_results

    trees = {"after": REPO, **({"before": args.baseline_tree.resolve()} if args.baseline_tree else {})}
    measured: dict[str, dict[str, list[dict]]] = {}
    for world in args.world:
        measured[str(world)] = {}
        for name in sorted(trees, reverse=True):  # before first
            measured[str(world)][name] = run_world(trees[name], world, args.shard_mb, args.rounds)
            print(f"W={world} {name}: " + json.dumps(measured[str(world)][name][0]), flush=True)
    costs = throughput(args.shard_mb)
    payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0], "shard_mb": args.shard_mb,
               "measured": measured, "costs": costs, "fs_gbps_per_rank": args.fs_gbps_per_rank,
               "fs_gbps_total": args.fs_gbps_total,
               "extrapolated": extrapolate(costs, args.fs_gbps_per_rank, args.fs_gbps_total)}
    text = table(payload)
    write_results("checkpoint_scale", payload, text)
    print(text)


if __name__ == "__main__":
    main()
