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
need too); after a barrier rank 0 writes the manifest and renames the directory into place, so a kill at any
moment leaves no directory that looks complete but is not, and a full disk removes the partial one
(CheckpointSpaceError, one line).

Integrity costs each rank its own files, not the whole checkpoint (at xl on 32 ranks a whole-checkpoint pass per
rank read ~0.3 TB per restart):
- Saving: the files this module serializes are hashed while they are written (fsutil.HashingWriter); the files
  DCP or DeepSpeed write are hashed by the rank that wrote them (`owner`: rank r owns rank_<r>.pt, DCP's
  __<r>_*.distcp and DeepSpeed's *_rank_<r>_* files; rank 0 the rest), in parallel, and fsynced by it. Each rank
  leaves its digests in .digests/rank_<r>.json; rank 0 merges them into the manifest.
- Resuming: every rank checks the manifest and the size of every file (a stat each), and hashes only the files
  it owns at the current world size; the ranks agree before a checkpoint is used, so a bit flip in any shard
  sends every rank back to the same earlier checkpoint. `ebt eval`/`generate`/`export` hash only what they load.
- `ebt checkpoint verify RUN_OR_CHECKPOINT` hashes everything, on demand (launch/checkpoint_cli.py).
A checkpoint with dcp/ is marked `reshardable`: it may be resumed with another number of ranks (launch/trainer.py
says what stays exact); the others need the same one. Files load with `torch.load(weights_only=True)`: a pickle
that would call anything beyond plain data and tensors is refused (CheckpointUnsafeError, one line).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsutil import (
    HashingWriter,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    chmod_like_open,
    fsync_dir,
    fsync_file,
    replace_dir,
    sha256_file,
)
from launch.async_save import BackgroundSaver, stage
from launch.cli import RunError
from launch.run_dir import find_tokenizer, load_model, resolve_checkpoint  # also the public path (README)

MANIFEST = "manifest.json"
DIGESTS_DIR = ".digests"  # per-rank digests inside .tmp-step_<N>, merged into the manifest and removed
DCP_DIR = "dcp"  # as launch.fsdp.DCP_DIR (not imported: this module must not need torch.distributed)
STEP_RE = re.compile(r"^step_(\d+)$")
# Files named after the rank that writes them: ours (rank_<r>.pt), DCP's (__<r>_<i>.distcp) and DeepSpeed's
# (zero_pp_rank_<r>_mp_rank_00_optim_states.pt). Everything else is written by rank 0.
RANK_FILE_RES = (re.compile(r"(?:^|/)rank_(\d+)\.pt$"), re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"),
                 re.compile(r"zero_pp_rank_(\d+)_[^/]*$"))


def owner(rel: str, world_size: int) -> int:
    """The rank that hashes file `rel` (relative to the checkpoint): the rank that wrote it, folded onto
    `world_size` ranks when fewer read it back; rank 0 for the files only rank 0 writes."""
    for pattern in RANK_FILE_RES:
        if match := pattern.search(rel):
            return int(match.group(1)) % max(world_size, 1)
    return 0


def _noop() -> None:
    return None


class CheckpointSpaceError(RunError):
    """The disk (or quota) filled up while saving a checkpoint: one line, exit 1, no traceback (launch/cli.py)."""


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = _noop, log: Callable[[str], None] = print,
                 all_sum: Callable[[list[float]], list[float]] | None = None,
                 background: BackgroundSaver | None = None,
                 background_collectives: tuple[Callable[[], None], Callable | None] | None = None,
                 background_group: Any = None) -> None:
        """`all_sum`: the values summed over ranks (a collective); None: one process (or `barrier` only, and a
        full disk on one rank is not known to the others). `background`: write checkpoints in that saver's
        thread, with `background_collectives` (barrier, all_sum) on a process group of their own
        (launch/async_save.py), `background_group` (DCP's collectives run on it); None: every save blocks."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.log = log
        self.all_sum = all_sum
        self.background = background
        self.background_collectives = background_collectives or (barrier, all_sum)
        self.background_group = background_group
        self.last_stage_s = 0.0  # the time the last save blocked training to stage its state (async saves)

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any], config_yaml: str,
             deepspeed_engine: Any = None, sharded_save: Callable[[Path], None] | None = None,
             other_bytes: Callable[[], int] | None = None,
             sharded_stage: Callable[[], Callable[[Path, Any], None]] | None = None) -> Path:
        """Collective: every rank calls it. `shared` is written by rank 0 only; `sharded_save(directory)` is
        called on every rank to write its shards (DCP) into the checkpoint's dcp/.

        A full disk (ENOSPC or EDQUOT, on any rank, at any stage) removes the partial `.tmp-step_N` and raises
        CheckpointSpaceError on every rank, whose one line (rank 0's) gives the bytes the checkpoint needs: the
        serialized size of what this manager writes plus `other_bytes()`, this rank's estimate of what
        DeepSpeed or DCP writes (asked only then). The checkpoints already saved are untouched.

        With a background saver, and no DeepSpeed engine (it writes its own state), the state is staged in host
        memory and written in the background: the call returns the path the checkpoint will have, and `wait()`
        returns once it does (raising what the write raised). A DCP writer needs `sharded_stage` for that: called
        here, it stages this rank's shards and returns their writer, `write(directory, process_group)`, which the
        background thread runs where `sharded_save` would run, on `background_group`; so the rank files, the
        hashes, the manifest and the rename still follow the DCP write. Without it DCP saves block."""
        staged_shards = sharded_save is None or sharded_stage is not None
        if self.background is not None and deepspeed_engine is None and staged_shards:
            start = time.perf_counter()
            self.background.wait()  # one write in flight at most; its error surfaces here
            shared, per_rank = stage(shared), stage(per_rank)
            write_shards = None
            if sharded_stage is not None:
                write_staged, group = sharded_stage(), self.background_group

                def write_shards(directory: Path) -> None:
                    write_staged(directory, group)
            self.last_stage_s = time.perf_counter() - start
            barrier, all_sum = self.background_collectives
            self.background.submit(lambda: self._save_now(step, shared, per_rank, config_yaml, None, write_shards,
                                                          other_bytes, barrier, all_sum))
            return self.root / f"step_{step}"
        if self.background is not None:
            self.background.wait()  # a synchronous save after an asynchronous one: in order
        return self._save_now(step, shared, per_rank, config_yaml, deepspeed_engine, sharded_save, other_bytes,
                              self.barrier, self.all_sum)

    def wait(self) -> None:
        """Return once no checkpoint write is in flight (raising what it raised); a no-op without a saver."""
        if self.background is not None:
            self.background.wait()

    def _save_now(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any], config_yaml: str,
                  deepspeed_engine: Any, sharded_save: Callable[[Path], None] | None,
                  other_bytes: Callable[[], int] | None, barrier: Callable[[], None],
                  all_sum: Callable[[list[float]], list[float]] | None) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"

        def start() -> None:
            if self.rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()

        written: dict[str, dict[str, Any]] = {}  # what this rank serialized itself, hashed on the way out

        def write() -> None:
            written[f"rank_{self.rank}.pt"] = _save_pt(per_rank, tmp / f"rank_{self.rank}.pt")
            if deepspeed_engine is not None:
                # ZeRO partitions optimizer state per rank; DeepSpeed writes its own files (all ranks take part).
                deepspeed_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            if sharded_save is not None:
                sharded_save(tmp / DCP_DIR)
            if self.rank == 0:
                for name, obj in shared.items():
                    written[f"{name}.pt"] = _save_pt(obj, tmp / f"{name}.pt")
                (tmp / "config.yaml").write_text(config_yaml)
                fsync_file(tmp / "config.yaml")

        def digest() -> None:
            # Every rank fsyncs and digests the files it owns, in parallel with the others (the files it
            # serialized itself were hashed while written), and leaves the digests in a small file of its own.
            digests = dict(written)
            for path in _files(tmp):
                rel = path.relative_to(tmp).as_posix()
                if rel not in digests and owner(rel, self.world_size) == self.rank:
                    fsync_file(path)
                    digests[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            (tmp / DIGESTS_DIR).mkdir(exist_ok=True)
            atomic_write_json(tmp / DIGESTS_DIR / f"rank_{self.rank}.json", digests)

        def finish() -> None:
            if self.rank == 0:
                files: dict[str, dict[str, Any]] = {}
                for part in sorted((tmp / DIGESTS_DIR).glob("rank_*.json")):
                    files.update(json.loads(part.read_text()))
                shutil.rmtree(tmp / DIGESTS_DIR)
                for path in _files(tmp):  # a file no rank claimed (a name the rules above do not know)
                    rel = path.relative_to(tmp).as_posix()
                    if rel not in files:
                        fsync_file(path)
                        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
                for directory in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
                    fsync_dir(directory)  # the names, as the files' data: on disk before the manifest vouches
                manifest = {"step": step, "world_size": self.world_size, "reshardable": sharded_save is not None,
                            "files": dict(sorted(files.items()))}
                atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
                # A re-save of the same step (e.g. final == periodic) replaces it.
                replace_dir(tmp, final, sync=False)
                self._prune()

        # Each stage ends where the ranks used to meet at a barrier; they now also agree there on whether any of
        # them ran out of space, so that all give up together instead of the others waiting on the one that raised.
        for phase in (start, write, digest, finish):
            if self._anyone(_disk_full_in(phase), barrier, all_sum):
                needed = _serialized_bytes(per_rank) + (other_bytes() if other_bytes is not None else 0)
                if self.rank == 0:
                    needed += sum(_serialized_bytes(obj) for obj in shared.values()) + len(config_yaml.encode())
                self._give_up(step, tmp, needed, barrier, all_sum)
        return final

    def _anyone(self, flag: bool, barrier: Callable[[], None], all_sum: Callable | None) -> bool:
        """A barrier that also tells whether `flag` is set on any rank."""
        if all_sum is None:
            barrier()
            return flag
        return all_sum([float(flag)])[0] > 0

    def _give_up(self, step: int, tmp: Path, needed: int, barrier: Callable[[], None],
                 all_sum: Callable | None) -> None:
        """After a full disk: remove the partial checkpoint, then raise CheckpointSpaceError on every rank."""
        if all_sum is not None:
            needed = int(all_sum([float(needed)])[0])
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
        barrier()  # no rank leaves before the partial directory is gone
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

    def latest_valid(self, gather: Callable[[Any], list[Any]] | None = None,
                     hashed: Callable[[str], bool] | None = None) -> Path | None:
        """Newest checkpoint whose manifest checks out; each bad one is reported and skipped.

        Called by every rank: each checks every file's size and hashes the files it owns (`owner`), and
        `gather` (an all-gather of one object; None: one process) lets the ranks agree, so all of them fall
        back past a checkpoint that any of them found bad. The first problem found is reported. `hashed`: which
        files to hash instead (see `verify`), e.g. only what a model load reads."""
        for step in sorted(self.list_steps(), reverse=True):
            path = self.root / f"step_{step}"
            problem = verify(path, world_size=self.world_size, rank=self.rank, ranks=self.world_size, hashed=hashed)
            problems = [problem] if gather is None else gather(problem)
            found = next((p for p in problems if p is not None), None)
            if found is None:
                return path
            self.log(f"checkpoint {path} is unusable ({found}); falling back to an earlier one")
        return None

    # ------------------------------------------------------------------------------------------------ load
    def load_shared(self, path: Path, name: str) -> Any:
        return load_pt(path / f"{name}.pt")

    def load_rank(self, path: Path, rank: int | None = None) -> Any:
        """This rank's per-rank state, or another rank's (a resharded resume, see launch/trainer.py)."""
        return load_pt(path / f"rank_{self.rank if rank is None else rank}.pt")

    def saved_world_size(self, path: Path) -> int:
        return int(json.loads((path / MANIFEST).read_text())["world_size"])


def verify(path: Path, world_size: int | None = None, *, rank: int = 0, ranks: int = 1,
           hashed: Callable[[str], bool] | None = None) -> str | None:
    """None when `path` is a complete checkpoint, else a short reason. A checkpoint saved with another world
    size is refused unless it is reshardable (sharded by fsdp, in DCP files).

    Every file's presence and size is checked (a stat each); its sha256 is recomputed only where `hashed(rel)`
    says so, by default for the files that `rank` of `ranks` owns (`owner`): with the defaults, one process
    hashes everything. `hashed=lambda rel: False` is the cheap check (manifest and sizes)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        sizes = {rel: int(meta["bytes"]) for rel, meta in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return "manifest is corrupt"
    if world_size is not None and manifest.get("world_size") != world_size and not manifest.get("reshardable"):
        return (f"saved with {manifest.get('world_size')} ranks but this run has {world_size}; "
                "the per-rank data and RNG state cannot be remapped")
    if hashed is None:
        def hashed(rel: str) -> bool:
            return owner(rel, ranks) == rank
    for rel, size in sizes.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != size:
            return f"{rel} is truncated ({file.stat().st_size} of {size} bytes)"
    for rel, meta in files.items():
        if hashed(rel) and sha256_file(path / rel) != meta["sha256"]:
            return f"{rel} fails its checksum"
    return None


def _files(directory: Path) -> list[Path]:
    """The files of a checkpoint being written, sorted, without the per-rank digests."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and DIGESTS_DIR not in p.relative_to(directory).parts)


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


def _save_pt(obj: Any, path: Path) -> dict[str, Any]:
    """torch.save `obj` to `path`, fsynced; returns its manifest entry (sha256 and bytes, computed as written)."""
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": writer.hexdigest(), "bytes": writer.bytes}


class CheckpointUnsafeError(RunError):
    """A checkpoint file whose pickle would call something other than plain data: never loaded (one line)."""


def _plain_data_globals() -> list[Any]:
    """What the project's own files hold beyond tensors and Python containers: numpy's RNG state (an array of
    uint32) in rank_<r>.pt. Allowed by name; any other global in a pickle is refused."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_pt(path: Path) -> Any:
    """A checkpoint file, loaded as data only (`weights_only=True`), so loading a checkpoint someone shared cannot
    run code. A file whose pickle names anything else raises CheckpointUnsafeError, naming the file and the call."""
    import pickle

    try:
        with torch.serialization.safe_globals(_plain_data_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        call = found.group(1) if found else "an object that is not plain data"
        raise CheckpointUnsafeError(f"{path}: refusing to load it: its pickle calls {call}, which is not plain data "
                                    "(loading it could run code); only checkpoints written by ebt load") from None


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
            copy_tokenizer(find_tokenizer(source, model_vocab=cfg.architecture.vocab_size), tmp)
        except (ValueError, FileNotFoundError):
            pass
        check_export_target(out, force)  # again, just before the swap: files that appeared meanwhile are kept
    return out
