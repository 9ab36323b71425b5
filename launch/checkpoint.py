"""Atomic, checksummed, multi-rank checkpoints and model loading.

Layout of `checkpoints/step_<N>/`:
  model.pt        model state_dict (rank 0; replicated under DDP and ZeRO-1/2)
  optimizer.pt    optimizer state (rank 0, DDP; DeepSpeed keeps its partitions under deepspeed/)
  dcp/            fsdp only, instead of model.pt and optimizer.pt: every rank's shards of the model and the
                  optimizer, written by torch.distributed.checkpoint (DCP); loadable at any world size
  trainer.pt      step/token counters, scheduler, failure counters, wandb id, global batch
  rank_<r>.pt     per rank: RNG states (python, numpy, torch CPU/CUDA), data-loader state, EBT replay buffer
  config.yaml     the resolved training config
  manifest.json   sha256 and size of every file above (DCP's included), written LAST
Every rank writes into `checkpoints/.tmp-step_<N>/` (a shared filesystem across nodes, as DeepSpeed's files
need too); after a barrier rank 0 fsyncs, writes the manifest and renames the directory into place, so a kill
at any moment leaves no directory that looks complete but is not. Loading verifies the manifest; a directory
that fails is reported and the previous one is used. A checkpoint with dcp/ is marked `reshardable`: it may be
resumed with another number of ranks (launch/trainer.py says what stays exact); the others need the same one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsutil import atomic_dir, atomic_write_text, chmod_like_open, fsync_file, fsync_tree, replace_dir, sha256_file

MANIFEST = "manifest.json"
DCP_DIR = "dcp"  # as launch.fsdp.DCP_DIR (not imported: this module must not need torch.distributed)
STEP_RE = re.compile(r"^step_(\d+)$")


def _noop() -> None:
    return None


class CheckpointError(Exception):
    pass


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = _noop, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.log = log

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any], config_yaml: str,
             deepspeed_engine: Any = None, sharded_save: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it. `shared` is written by rank 0 only; `sharded_save(directory)` is
        called on every rank to write its shards (DCP) into the checkpoint's dcp/."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
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
        self.barrier()
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
        self.barrier()
        return final

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
        return _load_pt(path / f"{name}.pt")

    def load_rank(self, path: Path, rank: int | None = None) -> Any:
        """This rank's per-rank state, or another rank's (a resharded resume, see launch/trainer.py)."""
        return _load_pt(path / f"rank_{self.rank if rank is None else rank}.pt")

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


def _save_pt(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_pt(path: Path) -> Any:
    # weights_only=False: our own files hold numpy RNG state and plain Python objects.
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- models


def _model_cfg_from_yaml(path: Path):
    from omegaconf import OmegaConf

    from ebt import ModelConfig

    data = OmegaConf.to_container(OmegaConf.load(path))
    section = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no model section")
    return ModelConfig(**section)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, an export dir, a run dir (its newest valid checkpoint) or its checkpoints/ dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if (path / "model.safetensors").is_file() or (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and any(STEP_RE.match(p.name) for p in root.iterdir()):
            latest = CheckpointManager(root, keep_last=1).latest_valid()
            if latest is None:
                raise FileNotFoundError(f"{path}: no valid checkpoint")
            return latest
    raise FileNotFoundError(f"{path}: neither a checkpoint, an export nor a run directory")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, model_cfg) from a checkpoint dir, an `ebt export` dir, or a run dir (newest valid checkpoint)."""
    from ebt import build_model

    path = resolve_checkpoint(path)
    cfg = _model_cfg_from_yaml(path / "config.yaml")
    model = build_model(cfg)
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open
        from safetensors.torch import load_model as st_load_model

        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
        check_weights_match(path, model, shapes)
        st_load_model(model, str(path / "model.safetensors"), device=str(device))
    else:
        problem = verify(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} is unusable: {problem}")
        if (path / DCP_DIR).is_dir() and not (path / "model.pt").is_file():
            state = _load_dcp_model(path, model)
        else:
            state = _load_pt(path / "model.pt")
            check_weights_match(path, model, {key: tuple(value.shape) for key, value in state.items()})
        model.load_state_dict(state)
    return model.to(device).eval(), cfg


def _load_dcp_model(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (fsdp) checkpoint, read in this one process without a process group.

    The shards were saved under the names of the model's own parameters, with 0-d ones (alpha) as [1] (FSDP
    shards dim 0); they are read at the saved shapes and given the model's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    saved = {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    expected = model.state_dict()
    shapes = {key: tuple(expected[key].shape) if key in expected and shape == (1,) and expected[key].dim() == 0
              else shape for key, shape in saved.items()}
    check_weights_match(path, model, shapes)
    buffers = {key: torch.empty(saved[key], dtype=expected[key].dtype) for key in expected if key in saved}
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": buffers}, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    return {key: value.reshape(expected[key].shape) for key, value in buffers.items()}


def check_weights_match(path: Path, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """One line naming the first weight whose name or shape differs from what the checkpoint's config.yaml
    builds (load_state_dict would list every one over many lines). A weight tied to one that is present (the
    safetensors de-duplication of shared tensors) does not count as missing."""
    expected = model.state_dict()
    shared: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        shared.setdefault(tensor.data_ptr() or id(tensor), []).append(key)
    hint = "config.yaml does not describe these weights (edited, or copied from another run?)"
    for key, tensor in expected.items():
        want = tuple(tensor.shape)
        if key in shapes and shapes[key] != want:
            raise ValueError(f"checkpoint {path}: weight {key!r} has shape {list(shapes[key])} but its config.yaml "
                             f"builds {list(want)}; {hint}")
        tied = shared[tensor.data_ptr() or id(tensor)]
        if key not in shapes and not any(other in shapes for other in tied):
            missing = sum(1 for k in expected if k not in shapes)
            raise ValueError(f"checkpoint {path}: weight {key!r} (shape {list(want)}) is missing"
                             f"{f' (and {missing - 1} more)' if missing > 1 else ''}; {hint}")
    unexpected = [key for key in shapes if key not in expected]
    if unexpected:
        raise ValueError(f"checkpoint {path}: weight {unexpected[0]!r} (shape {list(shapes[unexpected[0]])}) is not "
                         f"in the model its config.yaml builds"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; {hint}")


def export_model(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """safetensors weights plus config.yaml (the model section), written atomically as a directory."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    model, cfg = load_model(checkpoint)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        # save_model (not save_file) de-duplicates tied weights, which safetensors cannot store twice.
        save_model(model, str(tmp / "model.safetensors"))
        chmod_like_open(tmp / "model.safetensors")  # safetensors creates it 0600; an export is shared like any output
        import dataclasses

        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)})))
        # The tokenizer travels with the weights (tokenizer/), so generate and eval need nothing else. A checkpoint
        # whose tokenizer cannot be found is still exported; `ebt export` says so (launch/run_tokenizer.py).
        from launch.run_tokenizer import copy_tokenizer, find_tokenizer

        try:
            copy_tokenizer(find_tokenizer(resolve_checkpoint(checkpoint), model_vocab=cfg.vocab_size), tmp)
        except (ValueError, FileNotFoundError):
            pass
    return out
