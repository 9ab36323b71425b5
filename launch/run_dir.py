"""A run dir's files: what a path names, its saved config, its tokenizer (kept beside the weights, found again)
and its model.

Every command that reads a trained model (`ebt generate`, `ebt eval`, `ebt export`, the lm-eval adapter, the
benchmarks) and the resume path read it through here. Three kinds of directory hold a model:

  run dir         `runs/<name>/`: config.yaml (the full TrainConfig), checkpoints/step_<N>/, tokenizer/ (a copy
                  of the tokenizer it trained with, `keep_run_tokenizer`)
  checkpoint dir  `<run dir>/checkpoints/step_<N>/`: manifest, weights (model.pt or dcp/) and config.yaml, the
                  full TrainConfig (launch/checkpoint.py writes and verifies it)
  export dir      `ebt export`'s output: model.safetensors, config.yaml (the model section only), tokenizer/

`resolve_checkpoint` turns any of them into a checkpoint or export dir, which the rest take: `model_config` (the
model section), `data_config` (the data section, which an export does not keep), `find_tokenizer` and
`load_model`. `read_config` is the one reader of a config.yaml; launch.config.load_saved_config builds the full
TrainConfig from it.

The data pipeline keeps a tokenizer under `<data.cache_dir>/tokenizers/spm<V>-<hash>/`, a name derived from the
data config and relative to the directory training ran in, so a run dir alone would not say where its tokenizer
is. `ebt train` therefore copies it into `<run dir>/tokenizer/` (`keep_run_tokenizer`) and `ebt export` into
`<export>/tokenizer/` (`copy_tokenizer`; two small files); `find_tokenizer` looks there first, then at what the
data config derives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsutil import atomic_dir

if TYPE_CHECKING:
    import torch

    from data_pipeline import DataConfig
    from ebt import ModelConfig

CONFIG_FILE = "config.yaml"
KEPT_DIR = "tokenizer"  # <run dir>/tokenizer and <export dir>/tokenizer (copy_tokenizer writes them)


# ---------------------------------------------------------------------------------------------- where


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, an export dir, a run dir (its newest valid checkpoint) or its checkpoints/ dir."""
    from launch.checkpoint import MANIFEST, STEP_RE, CheckpointManager

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if (path / "model.safetensors").is_file() or (path / MANIFEST).is_file():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and any(STEP_RE.match(p.name) for p in root.iterdir()):
            latest = CheckpointManager(root, keep_last=1).latest_valid(hashed=model_files)
            if latest is None:
                raise FileNotFoundError(f"{path}: no valid checkpoint")
            return latest
    raise FileNotFoundError(f"{path}: neither a checkpoint, an export nor a run directory")


def model_files(rel: str) -> bool:
    """The files of a checkpoint that reading its model reads (and so hashes): not the optimizer's or the per-rank
    state, which at scale are most of its bytes (launch/checkpoint.py)."""
    return rel in ("model.pt", CONFIG_FILE) or rel.startswith("dcp/")


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir that holds `checkpoint` (<run>/checkpoints/step_N), or None for an export dir."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


# ---------------------------------------------------------------------------------------------- saved config


def read_config(path: Path) -> Any:
    """A saved config.yaml (a run's, a checkpoint's or an export's) as plain containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def model_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig in a resolved checkpoint's or export's config.yaml (its model section)."""
    from ebt import ModelConfig

    path = checkpoint / CONFIG_FILE
    data = read_config(path)
    section = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no model section")
    try:
        return ModelConfig.from_dict(section)
    except (ValueError, TypeError) as error:  # e.g. a flat key of a config written before the sections
        raise ValueError(f"{path}: {str(error).splitlines()[0]}") from None


def data_config(checkpoint: Path) -> DataConfig | None:
    """The DataConfig in the checkpoint's (else its run dir's) config.yaml; None when it keeps none (an export)."""
    from data_pipeline import DataConfig

    run_dir = run_dir_of(checkpoint)
    for path in (checkpoint / CONFIG_FILE, *([run_dir / CONFIG_FILE] if run_dir else [])):
        if path.is_file():
            raw = read_config(path)
            if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
                try:
                    return DataConfig.from_dict(raw["data"])
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{path}: data section does not match DataConfig ({error})") from None
    return None


# ---------------------------------------------------------------------------------------------- tokenizer


def find_tokenizer(checkpoint: str | Path, explicit: str | None = None, model_vocab: int | None = None) -> str:
    """The tokenizer dir of a resolved checkpoint or export dir.

    Order: `explicit` (--tokenizer), the copy in the export or run dir, then the data config's tokenizer.
    With `model_vocab`, a tokenizer of another vocabulary is refused: its ids would mean other pieces.
    """
    from data_pipeline.tokenizer import META_FILE, MODEL_FILE, load_meta, tokenizer_exists

    checkpoint = Path(checkpoint)
    if explicit is not None:
        if not tokenizer_exists(explicit):
            raise FileNotFoundError(f"--tokenizer {explicit}: no {MODEL_FILE} and {META_FILE} there")
        found = explicit
    else:
        found = _kept_or_derived(checkpoint)
    if model_vocab is not None:
        vocab = load_meta(found).vocab_size
        if vocab != model_vocab:
            raise ValueError(f"tokenizer {found} has {vocab} pieces but the model's vocab_size is {model_vocab}: "
                             "not the tokenizer this model was trained with")
    return found


def _kept_or_derived(checkpoint: Path) -> str:
    import os

    from data_pipeline.tokenizer import tokenizer_exists

    run_dir = run_dir_of(checkpoint)
    for kept in (checkpoint / KEPT_DIR, *([run_dir / KEPT_DIR] if run_dir else [])):
        if tokenizer_exists(str(kept)):
            return str(kept)
    data = data_config(checkpoint)
    if data is None:
        raise ValueError(f"{checkpoint} keeps no tokenizer ({checkpoint / KEPT_DIR} is missing) and no data config "
                         "(an `ebt export` dir from before exports carried one?): pass --tokenizer DIR")
    if data.tokenizer:
        derived = data.tokenizer
    else:
        from data_pipeline.api import tokenizer_dir
        from data_pipeline.sources import build_source

        try:
            derived = tokenizer_dir(data, build_source(data))
        except (FileNotFoundError, ValueError) as error:
            raise FileNotFoundError(f"{checkpoint}: its training data is needed to locate its tokenizer and cannot be "
                                    f"read ({error}); pass --tokenizer DIR") from None
    if not tokenizer_exists(derived):
        where = (f" (data.cache_dir {data.cache_dir!r} is relative to the directory training ran in)"
                 if not os.path.isabs(derived) else "")
        raise FileNotFoundError(f"{checkpoint}: its tokenizer {derived} does not exist{where}; run from that directory "
                                "or pass --tokenizer DIR")
    return derived


def copy_tokenizer(source: str, out_dir: Path) -> Path:
    """Copy a tokenizer's two files into out_dir/tokenizer (atomically: a temp dir renamed into place)."""
    from data_pipeline.tokenizer import META_FILE, MODEL_FILE

    dest = out_dir / KEPT_DIR
    with atomic_dir(dest) as tmp:
        for name in (MODEL_FILE, META_FILE):
            shutil.copyfile(Path(source) / name, tmp / name)
    return dest


def keep_run_tokenizer(cfg) -> Path | None:
    """Copy the tokenizer a TrainConfig trains with into its run dir, unless the same one is there already.

    Called by rank 0 once the data is prepared; returns the copy (None when the tokenizer is not on disk)."""
    from data_pipeline.api import tokenizer_dir
    from data_pipeline.sources import build_source
    from data_pipeline.tokenizer import load_meta, tokenizer_exists

    source = cfg.data.tokenizer or tokenizer_dir(cfg.data, build_source(cfg.data))
    if not tokenizer_exists(source):
        return None
    kept = cfg.run_dir / KEPT_DIR
    if tokenizer_exists(str(kept)) and load_meta(str(kept)).model_sha256 == load_meta(source).model_sha256:
        return kept
    return copy_tokenizer(source, cfg.run_dir)


# ---------------------------------------------------------------------------------------------- model


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, model_cfg) from a checkpoint dir, an `ebt export` dir, or a run dir (newest valid checkpoint)."""
    from ebt import build_model
    from launch.checkpoint import DCP_DIR, load_pt, verify

    given = Path(path)
    path = resolve_checkpoint(given)  # a run dir's newest checkpoint is verified there, as verify() does below
    cfg = model_config(path)
    model = build_model(cfg)
    if (path / "model.safetensors").is_file():
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_model as st_load_model

        file = path / "model.safetensors"
        check_safetensors_file(file)
        try:
            with safe_open(str(file), framework="pt") as weights:
                shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
            check_weights_match(path, model, shapes)
            st_load_model(model, str(file), device=str(device))
        except SafetensorError as error:  # what the size check cannot see, e.g. a bad dtype name in the header
            raise ValueError(f"{file}: corrupt safetensors file ({str(error).strip().splitlines()[0]})") from None
    else:
        problem = verify(path, hashed=model_files) if path == given else None
        if problem is not None:
            raise ValueError(f"checkpoint {path} is unusable: {problem}")
        if (path / DCP_DIR).is_dir() and not (path / "model.pt").is_file():
            state = _load_dcp_model(path, model)
        else:
            state = load_pt(path / "model.pt")
            check_weights_match(path, model, {key: tuple(value.shape) for key, value in state.items()})
        model.load_state_dict(state)
    return model.to(device).eval(), cfg


def check_safetensors_file(file: Path) -> None:
    """A one-line ValueError naming `file` and what is wrong unless it is a whole safetensors file: an 8-byte
    little-endian header length, that many bytes of JSON header, then the tensor bytes up to the largest end of
    any tensor's data_offsets. safetensors' own error ("incomplete metadata, file not fully covered") names
    neither the file nor the sizes; a truncated copy is the usual cause."""
    size = file.stat().st_size
    bad = f"{file}: truncated or corrupt safetensors file"
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{bad} ({size} bytes, not even the 8-byte header length)")
        header_bytes = int.from_bytes(prefix, "little")
        if 8 + header_bytes > size:  # checked before reading: a garbage length could be terabytes
            raise ValueError(f"{bad} (header says it is {header_bytes} bytes long, file has {size} bytes)")
        try:
            header = json.loads(handle.read(header_bytes))
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError,
                ValueError):
            raise ValueError(f"{bad} (its {header_bytes}-byte header is not a safetensors JSON header)") from None
    expected = 8 + header_bytes + end
    if size != expected:
        raise ValueError(f"{bad} (header says {expected} bytes, file has {size})")


def _load_dcp_model(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of a sharded (fsdp) checkpoint, read in this one process without a process group.

    The shards were saved under the names of the model's own parameters, with 0-d ones (alpha) as [1] (FSDP
    shards dim 0); they are read at the saved shapes and given the model's."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from launch.checkpoint import DCP_DIR

    metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    saved = {key.removeprefix("model."): tuple(meta.size) for key, meta in metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    expected = model.state_dict()
    shapes = {key: tuple(expected[key].shape) if key in expected and shape == (1,) and expected[key].dim() == 0
              else shape for key, shape in saved.items()}
    check_weights_match(path, model, shapes)
    buffers = {key: torch.empty(saved[key], dtype=expected[key].dtype) for key in expected if key in saved}
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
