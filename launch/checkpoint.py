"""Atomic, checksummed, multi-rank checkpoints, and `ebt export`. Reading a model back is launch/run_dir.py.

Layout of `checkpoints/step_<N>/`:
  model.pt        model state_dict (rank 0; replicated under DDP and ZeRO-1/2)
  optimizer.pt    optimizer state (rank 0, DDP; DeepSpeed keeps its partitions under deepspeed/)
  dcp/            fsdp only, instead of model.pt and optimizer.pt: every rank's shards of the model and the
                  optimizer, written by torch.distributed.checkpoint (DCP); loadable at any world size
  trainer.pt      step/token counters, failure counters, wandb id, global batch (no LR scheduler: the LR is a
                  function of config and step, launch/schedule.py; an older file's "scheduler" is ignored)
  rank_<r>.pt     per rank: RNG states (python, numpy, torch CPU/CUDA), data-loader state, EBT replay buffer
  config.yaml     the resolved training config
  manifest.json   sha256 and size of every file above (DCP's included), written LAST
Every rank writes into `checkpoints/.tmp-step_<N>/` (a shared filesystem across nodes, as DeepSpeed's files
need too); after a barrier rank 0 fsyncs, writes the manifest and renames the directory into place, so a kill
at any moment leaves no directory that looks complete but is not, and a full disk removes the partial one
(CheckpointSpaceError, one line). Loading verifies the manifest; a directory
that fails is reported and the previous one is used. A checkpoint with dcp/ is marked `reshardable`: it may be
resumed with another number of ranks (launch/trainer.py says what stays exact); the others need the same one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsutil import atomic_dir, atomic_write_text, chmod_like_open, fsync_file, fsync_tree, replace_dir, sha256_file
from launch.cli import RunError
from launch.run_dir import find_tokenizer, load_model, resolve_checkpoint  # also the public path (README)

MANIFEST = "manifest.json"
DCP_DIR = "dcp"  # as launch.fsdp.DCP_DIR (not imported: this module must not need torch.distributed)
STEP_RE = re.compile(r"^step_(\d+)$")


def _noop() -> None:
    return None


class CheckpointSpaceError(RunError):
    """The disk (or quota) filled up while saving a checkpoint: one line, exit 1, no traceback (launch/cli.py)."""


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = _noop, log: Callable[[str], None] = print,
                 all_sum: Callable[[list[float]], list[float]] | None = None) -> None:
        """`all_sum`: the values summed over ranks (a collective); None: one process (or `barrier` only, and a
        full disk on one rank is not known to the others)."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.log = log
        self.all_sum = all_sum

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any], config_yaml: str,
             deepspeed_engine: Any = None, sharded_save: Callable[[Path], None] | None = None,
             other_bytes: Callable[[], int] | None = None) -> Path:
        """Collective: every rank calls it. `shared` is written by rank 0 only; `sharded_save(directory)` is
        called on every rank to write its shards (DCP) into the checkpoint's dcp/.

        A full disk (ENOSPC or EDQUOT, on any rank, at any stage) removes the partial `.tmp-step_N` and raises
        CheckpointSpaceError on every rank, whose one line (rank 0's) gives the bytes the checkpoint needs: the
        serialized size of what this manager writes plus `other_bytes()`, this rank's estimate of what
        DeepSpeed or DCP writes (asked only then). The checkpoints already saved are untouched."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"

        def start() -> None:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()

        def write() -> None:
            _save_pt(per_rank, tmp / f"rank_{self.rank}.pt")
            if deepspeed_engine is not None:
                # ZeRO partitions optimizer state per rank; DeepSpeed writes its own files (all ranks take part).
                deepspeed_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            if sharded_save is not None:
                sharded_save(tmp / DCP_DIR)
            if self.rank == 0:
                for name, obj in shared.items():
                    _save_pt(obj, tmp / f"{name}.pt")
                (tmp / "config.yaml").write_text(config_yaml)
                fsync_file(tmp / "config.yaml")

        def finish() -> None:
            if self.rank == 0:
                fsync_tree(tmp)  # every rank's files are on disk before the manifest vouches for them
                files = {str(path.relative_to(tmp)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                         for path in sorted(p for p in tmp.rglob("*") if p.is_file())}
                manifest = {"step": step, "world_size": self.world_size, "reshardable": sharded_save is not None,
                            "files": files}
                atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
                # A re-save of the same step (e.g. final == periodic) replaces it.
                replace_dir(tmp, final, sync=False)
                self._prune()

        # Each stage ends where the ranks used to meet at a barrier; they now also agree there on whether any of
        # them ran out of space, so that all give up together instead of the others waiting on the one that raised.
        for stage in (start, write, finish):
            if self._anyone(_disk_full_in(stage)):
                needed = _serialized_bytes(per_rank) + (other_bytes() if other_bytes is not None else 0)
                if self.rank == 0:
                    needed += sum(_serialized_bytes(obj) for obj in shared.values()) + len(config_yaml.encode())
                self._give_up(step, tmp, needed)
        return final

    def _anyone(self, flag: bool) -> bool:
        """A barrier that also tells whether `flag` is set on any rank."""
        if self.all_sum is None:
            self.barrier()
            return flag
        return self.all_sum([float(flag)])[0] > 0

    def _give_up(self, step: int, tmp: Path, needed: int) -> None:
        """After a full disk: remove the partial checkpoint, then raise CheckpointSpaceError on every rank."""
        if self.all_sum is not None:
            needed = int(self.all_sum([float(needed)])[0])
        message = ""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # it holds what little space is left
            steps = self.list_steps()
            kept = f"step_{max(steps)} is still the newest checkpoint" if steps else "no checkpoint was saved yet"
            free = shutil.disk_usage(self.root).free
            message = (f"no space left on the device to save checkpoint step_{step} of the run in {self.root.parent}"
                       f": it needs {needed:,} bytes ({needed / 1e6:,.1f} MB) and {free:,} bytes are free; the "
                       f"partial checkpoint was removed and {kept}; free some space, then run the same command to "
                       "resume")
        self.barrier()  # no rank leaves before the partial directory is gone
        raise CheckpointSpaceError(message, quiet=self.rank != 0)

    def _prune(self) -> None:
        steps = sorted(self.list_steps(), reverse=True)
        for step in steps[self.keep_last:]:
            shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove temp directories that a killed save left behind (rank 0, before training)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.glob(".tmp-step_*"):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ find
    def list_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := STEP_RE.match(p.name)))

    def latest_valid(self) -> Path | None:
        """Newest checkpoint whose manifest checks out; each bad one is reported and skipped."""
        for step in sorted(self.list_steps(), reverse=True):
            path = self.root / f"step_{step}"
            problem = verify(path, world_size=self.world_size)
            if problem is None:
                return path
            self.log(f"checkpoint {path} is unusable ({problem}); falling back to an earlier one")
        return None

    # ------------------------------------------------------------------------------------------------ load
    def load_shared(self, path: Path, name: str) -> Any:
        return load_pt(path / f"{name}.pt")

    def load_rank(self, path: Path, rank: int | None = None) -> Any:
        """This rank's per-rank state, or another rank's (a resharded resume, see launch/trainer.py)."""
        return load_pt(path / f"rank_{self.rank if rank is None else rank}.pt")

    def saved_world_size(self, path: Path) -> int:
        return int(json.loads((path / MANIFEST).read_text())["world_size"])


def verify(path: Path, world_size: int | None = None) -> str | None:
    """None when `path` is a complete checkpoint, else a short reason. A checkpoint saved with another world
    size is refused unless it is reshardable (sharded by fsdp, in DCP files)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest is corrupt"
    if world_size is not None and manifest.get("world_size") != world_size and not manifest.get("reshardable"):
        return (f"saved with {manifest.get('world_size')} ranks but this run has {world_size}; "
                "the per-rank data and RNG state cannot be remapped")
    for rel, meta in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != meta["bytes"]:
            return f"{rel} is truncated ({file.stat().st_size} of {meta['bytes']} bytes)"
        if sha256_file(file) != meta["sha256"]:
            return f"{rel} fails its checksum"
    return None


def _disk_full_in(stage: Callable[[], None]) -> bool:
    """Run `stage`; True when it failed for want of space, which it then leaves to the caller. Any other error
    propagates."""
    try:
        stage()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if not _is_disk_full(error):
            raise
        return True
    return False


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether ENOSPC/EDQUOT is behind `error`. torch.save reports a failed write as a RuntimeError of its own
    ("unexpected pos 704 vs 598", measured on a full tmpfs) with the OSError as its context; DCP collects each
    rank's exception in CheckpointException.failures."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        stack += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():
            stack.append(failure[0] if isinstance(failure, tuple) else failure)
    return False


class _ByteCounter:
    """A write-only file that keeps nothing: torch.save into it measures a file's size without a disk."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _serialized_bytes(obj: Any) -> int:
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.size


def _save_pt(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_pt(path: Path) -> Any:
    """A .pt file this package wrote (a checkpoint's shared, per-rank or model file), onto the CPU."""
    # weights_only=False: our own files hold numpy RNG state and plain Python objects.
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- export


EXPORT_MARKER = ".ebt-export"  # written into every export: what `--force` may replace
EXPORT_FILES = {"model.safetensors", "config.yaml", "tokenizer", EXPORT_MARKER}


def check_export_target(out: Path, force: bool) -> None:
    """Refuse (ValueError, one line naming `out`), before anything is written, an output that is not ours to
    replace: a file, a link, or a directory with entries an export did not write. A previous export (its marker)
    is replaced only with `force`, and only when it holds nothing else. An empty directory holds nothing to lose."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"{out} exists and is {'a symbolic link' if out.is_symlink() else 'not a directory'}; "
                         "export into a new directory (nothing was changed)")
    if not out.is_dir():
        return
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    others = [name for name in entries if name not in EXPORT_FILES]
    if EXPORT_MARKER not in entries or others:
        shown = others or entries
        more = f" and {len(shown) - 1} more" if len(shown) > 1 else ""
        what = ("holds a previous export plus files it did not write" if EXPORT_MARKER in entries
                else "is a directory that is not an `ebt export` output")
        raise ValueError(f"{out} {what} ({shown[0]}{more}); export into a new or empty directory (nothing was "
                         "changed, and --force never replaces other files)")
    if not force:
        raise ValueError(f"{out} holds a previous export; pass --force to replace it")


def export_model(checkpoint: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """safetensors weights plus config.yaml (the model section), written atomically as a directory, with a
    marker (EXPORT_MARKER: source and time) that lets a later `force` export replace it and nothing else."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    out = Path(out_dir)
    check_export_target(out, force)
    source = resolve_checkpoint(checkpoint)  # once: for a run dir it verifies every candidate's checksums
    model, cfg = load_model(source)
    with atomic_dir(out) as tmp:
        import time

        (tmp / EXPORT_MARKER).write_text(json.dumps({"source": str(source.resolve()),
                                                     "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        # save_model (not save_file) de-duplicates tied weights, which safetensors cannot store twice.
        save_model(model, str(tmp / "model.safetensors"))
        chmod_like_open(tmp / "model.safetensors")  # safetensors creates it 0600; an export is shared like any output
        import dataclasses

        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
        # The tokenizer travels with the weights (tokenizer/), so generate and eval need nothing else. A checkpoint
        # whose tokenizer cannot be found is still exported; `ebt export` says so (launch/run_dir.py).
        from launch.run_dir import copy_tokenizer

        try:
            copy_tokenizer(find_tokenizer(source, model_vocab=cfg.vocab_size), tmp)
        except (ValueError, FileNotFoundError):
            pass
        check_export_target(out, force)  # again, just before the swap: files that appeared meanwhile are kept
    return out
