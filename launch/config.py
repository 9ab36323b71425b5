"""Training configuration: YAML files merged with OmegaConf onto typed dataclasses, plus `key=value` overrides.

Why our own front end on top of OmegaConf: its structured configs already reject wrong types, but their
messages are multi-line and never suggest what the user meant. Every error here is one line that names the
offending key (`optim.lr`), suggests the closest valid key for typos, and is raised as `ValueError`, which the
CLI prints as `ebt train: error: ...`.

A training YAML may pull other YAML files in first with `include: [relative/path.yaml, ...]` (later files and
the including file win), which is how `configs/train/*.yaml` reuse `configs/model/<size>.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline import DataConfig
from ebt import ModelConfig
from ebt.checkpointing import POLICIES
from ebt.config import moved_key_message
from ebt.sizes import SIZES
from fsutil import atomic_write_text
from launch.allocator import CHOICES as ALLOCATOR_CHOICES
from launch.run_dir import read_config

T = TypeVar("T")

PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "deepspeed", "fsdp")


@dataclass
class OptimConfig:
    # None: take the size table's reference peak LR for model.size.
    lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    # The usual practice (and the default) exempts norm gains and biases from weight decay.
    decay_norms_and_biases: bool = False
    warmup_steps: int = 100
    # Cosine decays from the peak to peak * min_lr_scale at trainer.max_steps.
    min_lr_scale: float = 0.1
    # Max global gradient norm; 0 disables clipping.
    clip_grad_norm: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # auto: bf16 autocast where the device supports it (CUDA with bf16), else fp32.
    precision: str = "auto"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 16  # validation micro-batches per evaluation and rank; 0 = the whole split
    # A step whose loss or gradient is non-finite is skipped; this many in a row aborts the run.
    max_nonfinite_in_row: int = 5
    # Peak FLOP/s of one device for MFU; 0 measures a matmul at start-up (CPU) or uses a known table (CUDA).
    peak_flops: float = 0.0
    num_workers: int = 0
    # How a step is held in memory (ebt/checkpointing.py), never what it computes: none | block | mcmc_step |
    # block+mcmc_step | auto. Gradients are identical under every policy, so resuming may change it. auto asks
    # planning/ for the fastest policy, recompute chunk and micro-batch (a divisor of micro_batch_size x
    # grad_accum_steps) whose predicted peak fits memory_budget_gb (launch/memory_plan.py).
    checkpointing: str = "none"
    # "mcmc_step" policies recompute each step's second-order graph this many sequences at a time (0: the whole
    # micro-batch); smaller chunks lower the peak, results are unchanged.
    remat_chunk: int = 0
    # Per-rank memory budget for checkpointing=auto. None: the device's capacity minus a margin.
    memory_budget_gb: float | None = None
    # Host allocator of a CPU training process started by `ebt train`: auto (tcmalloc, else jemalloc, else the
    # C library's) | tcmalloc | jemalloc | system. glibc's heap fragments under second-order training
    # (launch/allocator.py); the EBT_CPU_ALLOCATOR environment variable wins.
    cpu_allocator: str = "auto"


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 disables periodic checkpoints (preemption and the final one still happen)
    keep_last: int = 3
    resume: bool = True  # resume from the newest valid checkpoint in the run dir
    save_final: bool = True
    # Write checkpoints in the background once the state is staged in host memory (launch/async_save.py), fsdp's
    # DCP shards included; DeepSpeed's files are always written in the foreground. False: every save blocks.
    async_save: bool = True


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled; the WANDB_MODE env var wins when set
    wandb_project: str = "ebt"
    progress: bool = True


@dataclass
class DistributedConfig:
    # ddp (also plain single process) | deepspeed (ZeRO-1/2; ZeRO-3 for Transformer++ only) | fsdp (FSDP2 with
    # sharded parameters, gradients and optimizer state, for both kinds: launch/fsdp.py)
    strategy: str = "ddp"
    deepspeed_config: str | None = None  # a configs/deepspeed/*.json file, required for strategy=deepspeed
    timeout_s: float = 600.0  # collective timeout: a dead rank makes the others fail within this bound
    # A rank whose heartbeat (launch/distributed.py Heartbeat) stops this long, e.g. `kill -STOP`, ends the job
    # with one line naming it; well under Slurm's 120 s warning so that a stuck job still ends in time. 0: off.
    stall_timeout_s: float = 60.0
    find_unused_parameters: bool = False
    # fsdp only: keep parameters sharded inside the step too, re-gathering each weight where the graph needs it
    # (launch/fsdp.py). Off: every block stays gathered for the whole step. Measured on CPU at 2 ranks: 0.85x the
    # gathered route's peak memory for 2.7x its step time, hence off by default (benchmarks/README.md).
    fsdp_regather: bool = False


@dataclass
class TrainConfig:
    name: str = "run"
    runs_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def peak_lr(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return SIZES[self.model.size].peak_lr if self.model.size else 1e-3


# ---------------------------------------------------------------------------------------------- key checking


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside a field annotation (`X`, `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _check_keys(raw: Any, schema: type, prefix: str = "") -> None:
    """Reject unknown keys, suggesting the closest valid one (difflib) at any depth."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    # Suggest among full dotted keys too, so `lr=...` at the top level points at `optim.lr`.
    for key, value in raw.items():
        if key not in names:
            full = f"{prefix}{key}"
            moved = moved_key_message(key, prefix) if prefix == "model." else None
            if moved:  # a key of the earlier flat model section: say where it lives now
                raise ValueError(moved)
            # A key given in the wrong section (`lr=...` for `optim.lr`) first, then typos within the section.
            elsewhere = [k for k in _all_keys(TrainConfig) if k.endswith(f".{key}")]
            # Typos are matched on the key's own name among this section's keys and those of its subsections, so
            # `model.n_layer` finds `model.architecture.n_layers` rather than a look-alike section name.
            # A close name in the section itself wins (`modle` -> `model`, not `data.mode`).
            below = {k.rsplit(".", 1)[-1]: f"{prefix}{k}" for k in reversed(_all_keys(schema))}
            close = (elsewhere or difflib.get_close_matches(full, [f"{prefix}{n}" for n in names], n=1, cutoff=0.75)
                     or [below[m] for m in difflib.get_close_matches(key, list(below), n=1, cutoff=0.5)])
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{full}'{suggestion}")
        sub = _dataclass_type(hints[key])
        if sub is not None and value is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        sub = _dataclass_type(hints[f.name])
        keys.append(prefix + f.name)
        if sub is not None:
            keys.extend(_all_keys(sub, f"{prefix}{f.name}."))
    return keys


# ---------------------------------------------------------------------------------------------- loading


def load_yaml(path: Path) -> Any:
    """A YAML file as plain containers, read by OmegaConf's loader (so `6.0e5` is a number, as YAML 1.2 has it)
    with interpolations left as written; a parse error is one line naming the file and line (_yaml_error).
    Training configs and sweep specs both read their files with it."""
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - yaml's parser errors are multi-line: one line instead
        raise ValueError(_yaml_error(Path(path), error)) from None
    return OmegaConf.to_container(node, resolve=False)


def _yaml_error(path: Path, error: Exception) -> str:
    """`FILE: not valid YAML at line N: problem`. yaml's message puts its context first ("while constructing a
    mapping") and the problem and its line on later lines, so the first line alone said nothing useful; a
    duplicate key is named by its dotted path, with the line where it first appears."""
    import yaml

    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if not isinstance(error, yaml.MarkedYAMLError) or mark is None or not problem:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{path}: not valid YAML ({first})"
    where = f"{path}: not valid YAML at line {mark.line + 1}"
    duplicate = re.fullmatch(r"found duplicate key (.*)", problem)
    if duplicate and error.context_mark is not None:
        key, first_line = _duplicate_key(path, error.context_mark.index, duplicate.group(1))
        first = f" (first at line {first_line})" if first_line else ""
        return f"{where}: duplicate key {key!r}{first}; a key may appear only once in a mapping"
    context = error.context_mark
    within = f" ({error.context} at line {context.line + 1})" if error.context and context is not None else ""
    return f"{where}: {problem}{within}"


def _duplicate_key(path: Path, mapping_index: int, key: str) -> tuple[str, int | None]:
    """(dotted path of `key` in the mapping that starts at character `mapping_index` of the file, line of its
    first occurrence there), from the file's node tree (composing does not check duplicates); (key, None) when
    the mapping is not found."""
    import yaml

    def find(node: yaml.Node, prefix: str) -> tuple[str, int | None] | None:
        children: list[tuple[str, yaml.Node]] = []
        if isinstance(node, yaml.MappingNode):
            if node.start_mark.index == mapping_index:
                lines = [k.start_mark.line + 1 for k, _ in node.value if k.value == key]
                return prefix + key, lines[0] if lines else None
            children = [(f"{prefix}{k.value}.", v) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(f"{prefix}{i}.", v) for i, v in enumerate(node.value)]
        for child_prefix, child in children:
            found = find(child, child_prefix)
            if found is not None:
                return found
        return None

    try:
        root = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return key, None
    found = find(root, "") if root is not None else None
    return found if found is not None else (key, None)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One YAML file with its `include:` files merged in underneath it."""
    path = path.resolve()
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f" (it holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''})" if inside else ""
        raise ValueError(f"config file {path} is a directory, not a YAML file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in seen:
        raise ValueError(f"{path}: include cycle")
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _merge(merged, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1` strings to a nested dict; values parse as YAML scalars/lists (OmegaConf's dotlist)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ValueError(f"bad override: {str(error).splitlines()[0]}") from None


def _literal(value: Any) -> Any:
    """`value` with every string escaped for OmegaConf, so that `${...}` in it stays text (see structured)."""
    if isinstance(value, str):
        # k backslashes before "${" are 2k escaped backslashes and an escaped "${" (OmegaConf's grammar).
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item) for item in value]
    return value


def structured(schema: type[T], raw: dict, prefix: str = "", *, interpolate: bool = True) -> T:
    """Merge `raw` onto the dataclass `schema` with OmegaConf: values are checked and converted to the field
    types, and a wrong one is one `ValueError` line naming the full key (`prefix` + its path). Training configs
    and sweep specs (slurm/spec.py) both go through here.

    `interpolate=False` takes every string literally: a sweep spec's shell lines use `${VAR}` for the shell."""
    if not interpolate:
        raw = _literal(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(raw))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = f"{prefix}{error.full_key}" if getattr(error, "full_key", None) else prefix.rstrip(".")
        msg = str(error).splitlines()[0]
        raise ValueError(f"config key '{key}': {msg}") from None
    except (ValueError, TypeError) as error:  # the dataclass's own __post_init__ validation
        msg = str(error).splitlines()[0]
        name, sep, rest = msg.partition(": ")
        if sep and all(part.isidentifier() for part in name.split(".")):  # "architecture.dim: must ..." -> full key
            raise ValueError(f"config key '{prefix}{name}': {rest}") from None
        raise ValueError(msg if prefix and msg.startswith(prefix) else f"{prefix}{msg}") from None


def _model_from_raw(raw: dict) -> ModelConfig:
    """Size-table dims first, explicit keys on top, so `size: xs` plus `architecture.dim: 512` means what it
    says. OmegaConf checks and converts the values' types; ModelConfig validates the result."""
    size = raw.get("size")
    base: dict = {}
    if size is not None:
        if size not in SIZES:
            close = difflib.get_close_matches(str(size), list(SIZES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(SIZES)}"
            raise ValueError(f"config key 'model.size': unknown size {size!r}{hint}")
        spec = SIZES[size]
        base = {"architecture": {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "dim": spec.dim}}
    return structured(ModelConfig, _merge(base, raw), "model.")


def build_config(raw: dict) -> TrainConfig:
    """A nested dict (already merged) to a validated TrainConfig."""
    _check_keys(raw, TrainConfig)
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    cfg: TrainConfig = structured(TrainConfig, {k: v for k, v in raw.items()}, "")
    # The model's vocabulary follows the tokenizer's unless set explicitly.
    model_raw = _merge({"architecture": {"vocab_size": cfg.data.vocab_size}}, model_raw)
    cfg.model = _model_from_raw(model_raw)
    validate(cfg)
    return cfg


def load_config(paths: list[str | Path] | str | Path, overrides: list[str] | None = None) -> TrainConfig:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for path in paths:
        raw = _merge(raw, _read_yaml(Path(path)))
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_config(raw)


def config_to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))


def load_saved_config(path: Path) -> TrainConfig:
    """The full TrainConfig a run or checkpoint saved (its config.yaml, read by launch/run_dir.py)."""
    return build_config(read_config(path))


# ---------------------------------------------------------------------------------------------- validation


def _err(key: str, msg: str) -> ValueError:
    return ValueError(f"config key '{key}': {msg}")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks: each failure names one key."""
    t, o, c, d = cfg.trainer, cfg.optim, cfg.checkpoint, cfg.distributed
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise _err("name", f"must be a plain directory name, got {cfg.name!r}")
    for key, value in (("trainer.max_steps", t.max_steps), ("trainer.micro_batch_size", t.micro_batch_size),
                       ("trainer.grad_accum_steps", t.grad_accum_steps), ("trainer.log_every", t.log_every),
                       ("trainer.max_nonfinite_in_row", t.max_nonfinite_in_row),
                       ("checkpoint.keep_last", c.keep_last)):
        if value < 1:
            raise _err(key, f"must be >= 1, got {value}")
    for key, value in (("trainer.eval_every", t.eval_every), ("trainer.eval_batches", t.eval_batches),
                       ("checkpoint.every", c.every), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.clip_grad_norm", o.clip_grad_norm),
                       ("trainer.num_workers", t.num_workers), ("trainer.peak_flops", t.peak_flops)):
        if value < 0:
            raise _err(key, f"must be >= 0, got {value}")
    if t.cpu_allocator not in ALLOCATOR_CHOICES:
        raise _err("trainer.cpu_allocator", f"must be auto, tcmalloc, jemalloc or system, got {t.cpu_allocator!r}")
    if t.checkpointing not in (*POLICIES, "auto"):
        raise _err("trainer.checkpointing", f"unknown policy {t.checkpointing!r}; expected one of "
                   f"{', '.join((*POLICIES, 'auto'))}")
    if t.remat_chunk < 0:
        raise _err("trainer.remat_chunk", f"must be >= 0 (0: whole micro-batch), got {t.remat_chunk}")
    if t.memory_budget_gb is not None:
        if not t.memory_budget_gb > 0:
            raise _err("trainer.memory_budget_gb", f"must be > 0, got {t.memory_budget_gb}")
        if t.checkpointing != "auto":
            raise _err("trainer.memory_budget_gb", "is only used with trainer.checkpointing=auto, not "
                       f"{t.checkpointing!r}")
    if o.lr is not None and not o.lr > 0:
        raise _err("optim.lr", f"must be > 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise _err("optim.betas", f"must be two numbers in [0, 1), got {o.betas}")
    if not 0.0 <= o.min_lr_scale <= 1.0:
        raise _err("optim.min_lr_scale", f"must lie in [0, 1], got {o.min_lr_scale}")
    if t.precision not in PRECISIONS:
        raise _err("trainer.precision", f"must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise _err("logging.wandb_mode", f"must be offline, online or disabled, got {cfg.logging.wandb_mode!r}")
    if d.strategy not in STRATEGIES:
        raise _err("distributed.strategy", f"must be one of {', '.join(STRATEGIES)}, got {d.strategy!r}")
    if d.timeout_s <= 0:
        raise _err("distributed.timeout_s", f"must be > 0, got {d.timeout_s}")
    if d.stall_timeout_s < 0:
        raise _err("distributed.stall_timeout_s", f"must be >= 0 (0: no heartbeat), got {d.stall_timeout_s}")
    if d.strategy == "deepspeed":
        if not d.deepspeed_config:
            raise _err("distributed.deepspeed_config", "strategy=deepspeed needs a configs/deepspeed/*.json file")
        stage = deepspeed_stage(d.deepspeed_config)
        if stage == 3 and cfg.model.kind == "ebt":
            # Measured with DeepSpeed 0.19.8 (2 gloo ranks, a width-64 2-layer EBT, K=2): the outer backward fails
            # with "size of tensor a (64) must match ... b (0)" under the defaults,
            # stage3_param_persistence_threshold/max_live_parameters 1e12, GatheredParameters and
            # set_z3_leaf_modules alike. Stage 3 releases parameters the graph still needs
            # (deepspeedai/DeepSpeed#3539, #7352; open PRs #8045 and #8135 address release during multi-backward).
            raise _err("distributed.deepspeed_config",
                       "ZeRO-3 cannot train an EBT: it releases gathered parameters that the second-order "
                       "(double) backward still needs (measured: a size-0 parameter in the outer backward under "
                       "every stage-3 setting tried; deepspeedai/DeepSpeed#3539); use ZeRO-1/2, or "
                       "distributed.strategy=fsdp to shard parameters")
    elif d.deepspeed_config:
        raise _err("distributed.deepspeed_config", f"is only used with distributed.strategy=deepspeed, "
                   f"not {d.strategy!r}")
    if d.fsdp_regather and d.strategy != "fsdp":
        raise _err("distributed.fsdp_regather", f"is only used with distributed.strategy=fsdp, not {d.strategy!r}")
    if cfg.model.architecture.context_length < 2:
        raise _err("model.architecture.context_length", "must be >= 2")


def deepspeed_stage(path: str) -> int:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"distributed.deepspeed_config: file not found: {path}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"distributed.deepspeed_config: {path} is not valid JSON ({error})") from None
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _dotted(tree: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_compatible(saved: dict, cfg: TrainConfig, run_dir: Path, world_changed: bool = False) -> None:
    """Resuming with a different model (or data/seed layout) would load mismatched state: refuse, naming the key.

    world_changed: the checkpoint is sharded (strategy=fsdp) and this run has another number of ranks. The
    global batch is then micro_batch_size x grad_accum_steps x ranks, so these two may change with it (the
    trainer logs the old and new global batch; keeping it equal continues the same optimisation)."""
    current = config_to_dict(cfg)
    # The memory knobs (trainer.checkpointing, remat_chunk, memory_budget_gb) change how a step is computed,
    # never its result, and are not compared: resuming may change them.
    now = _dotted(current["model"], "model.")
    for key, old in _dotted(saved.get("model", {}), "model.").items():
        new = now.get(key)
        if old != new:
            raise ValueError(f"config key '{key}': the run in {run_dir} was trained with {old!r} "
                             f"but this config says {new!r}; pick a new name= or remove the run dir")
    for key in ("seed",) if world_changed else ("micro_batch_size", "grad_accum_steps", "seed"):
        old, new = saved.get("trainer", {}).get(key), current["trainer"][key]
        if old is not None and old != new:
            raise ValueError(f"config key 'trainer.{key}': the run in {run_dir} used {old!r} but this config "
                             f"says {new!r}; resuming would not continue the same run")
