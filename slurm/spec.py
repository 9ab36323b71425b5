"""Sweep specs: one YAML file describing a grid of training runs and the Slurm resources each one needs.

A spec names a base trainer config and the points to run. Points are every combination of one `runs` entry
with the `grid` product (either may be absent); each point sets named axes (size, kind, lr, seed and one budget:
tokens, flops or steps) and/or any dotted trainer key (`optim.warmup_steps`). Priority, lowest first: the base
config, the size table's peak LR (when the point sets no lr), the spec's `overrides`, the point itself.

The file is read like a training config (launch.config: OmegaConf's YAML loader, values merged onto dataclass
schemas, each error one line naming the file and key), but with strings taken literally. Every point is resolved
through the trainer's own config loader at plan time, so a bad key or value fails before anything is submitted,
with the run's name in the message. Run names derive from the point only, so they are
stable across resubmits and across machines.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MERGED_ON_EXTEND = ("overrides", "slurm")  # merged key by key over the parent spec; every other key replaces it
AXES = ("size", "kind", "lr", "tokens", "flops", "steps", "seed")
BUDGET_AXES = ("tokens", "flops", "steps")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_LEN = 120


@dataclass(frozen=True)
class Resources:
    """What one run asks Slurm for. One task per GPU (or per CPU rank): world size = nodes x tasks_per_node."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpu_mem_gb: float | None = None  # the planning target (not an sbatch option): GB per GPU, default 80 (H100)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


RESOURCE_KEYS = tuple(f.name for f in dataclasses.fields(Resources))
DEFAULT_GPU_MEM_GB = 80.0


@dataclass(frozen=True)
class SlurmSettings:
    array_parallelism: int = 16  # at most this many array tasks of one resource group run at once
    max_requeues: int = 20  # submitit's slurm_max_num_timeout: timeouts/preemptions before giving up
    signal_delay_s: int = 120  # USR2 this long before the time limit (Slurm may send it up to 60 s earlier)
    setup: tuple[str, ...] = ()  # shell lines run in the sbatch script before srun (module load, venv, ...)
    sbatch: tuple[tuple[str, Any], ...] = ()  # extra `#SBATCH --key=value` lines
    python: str | None = None  # python command on the compute nodes; default: this interpreter


# ---------------------------------------------------------------------------------------------- schemas
# What a spec file may hold, as dataclasses that OmegaConf checks and converts values against (the training
# configs' path, launch.config.structured). Sections whose shape a type cannot say with a useful message (base: a
# path or kind -> path; grid: axis -> values; runs: a list of points) are `Any` here and checked by hand below.


@dataclass
class SlurmSchema:
    """`slurm:` as written (SlurmSettings is its frozen, hashable form)."""

    array_parallelism: int = 16
    max_requeues: int = 20
    signal_delay_s: int = 120
    setup: list[str] | None = None
    sbatch: dict[str, Any] | None = None
    python: str | None = None


@dataclass
class SizeDims:
    """One `size_dims:` entry: widths that stand in for a size's. Each key is optional: only the keys an entry
    sets are used (the defaults only complete the schema)."""

    n_layers: int = 1
    n_heads: int = 1
    dim: int = 1


@dataclass
class SpecSchema:
    name: str | None = None
    extends: str | None = None  # resolved by _read_spec before the schema sees the file
    base: Any = None
    runs_dir: str | None = None
    sweep_dir: str | None = None
    grid: Any = None
    runs: Any = None
    overrides: Any = None
    size_overrides: Any = None
    size_dims: Any = None
    global_batch_size: int | None = None
    resources: Any = None
    slurm: Any = None


SPEC_KEYS = tuple(f.name for f in dataclasses.fields(SpecSchema))
SLURM_KEYS = tuple(f.name for f in dataclasses.fields(SlurmSchema))
SIZE_DIM_KEYS = tuple(f.name for f in dataclasses.fields(SizeDims))


def _typed(schema: type[T], raw: dict, where: str, path: Path) -> T:
    """`raw` merged onto `schema` by the training configs' OmegaConf path: values converted to the field types,
    a wrong one a single line naming the file and the key. Strings are literal (a setup line's `${VAR}` is for
    the shell), as they were before specs went through OmegaConf."""
    from launch.config import structured

    try:
        return structured(schema, raw, where, interpolate=False)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _given(typed: Any, raw: dict) -> dict[str, Any]:
    """The converted values of the keys `raw` sets (an entry that merges over another must not set the rest)."""
    return {str(key): getattr(typed, str(key)) for key in raw}


@dataclass
class RunPlan:
    """One resolved run: its stable name, the point it came from, the full trainer config and its resources."""

    name: str
    point: dict[str, Any]
    overrides: list[str]
    config: Any  # launch.config.TrainConfig
    resources: Resources
    # What the sweep decides for this run: the base config files' digests and every key=value it sets. The
    # resolved config is deliberately not used: a trainer release that adds a config field with a default
    # would otherwise make every finished run look changed.
    inputs: dict[str, Any] = field(default_factory=dict)
    # GPU runs: the memory plan per GPU model (planning.GpuPlan, or the error line when it does not fit) and
    # the GPU model the run's config was planned for.
    gpu_plans: dict[str, Any] = field(default_factory=dict)
    planned_for: str | None = None

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.inputs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runs_dir) / self.config.name

    @property
    def max_steps(self) -> int:
        return int(self.config.trainer.max_steps)

    @property
    def tokens_per_step(self) -> int:
        t = self.config.trainer
        context = self.config.model.architecture.context_length
        return t.micro_batch_size * t.grad_accum_steps * self.resources.world_size * context


@dataclass
class SweepSpec:
    name: str
    path: Path
    bases: dict[str | None, Path]  # kind -> trainer config (one entry keyed None: every kind)
    runs_dir: Path
    sweep_dir: Path
    points: list[dict[str, Any]]
    overrides: dict[str, Any]
    global_batch_size: int | None
    default_resources: dict[str, Any]
    size_resources: dict[str, dict[str, Any]]
    slurm: SlurmSettings
    size_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_dims: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return next(iter(self.bases.values()))

    def base_for(self, kind: str | None) -> Path:
        if None in self.bases:
            return self.bases[None]
        if kind not in self.bases:
            raise ValueError(f"sweep '{self.name}': base has no config for kind {kind!r} (bases: "
                             f"{', '.join(str(k) for k in self.bases)})")
        return self.bases[kind]

    def plan(self) -> list[RunPlan]:
        """Resolve every point into a RunPlan (validates all of them before returning any)."""
        plans = [self._plan_point(point) for point in self.points]
        seen: dict[str, dict] = {}
        for p in plans:
            if p.name in seen:
                raise ValueError(f"sweep '{self.name}': points {seen[p.name]} and {p.point} both map to run name "
                                 f"'{p.name}'; make them differ in a named axis")
            seen[p.name] = p.point
        return plans

    # ------------------------------------------------------------------------------------------ internals
    def _base_config(self, base: Path) -> Any:
        from launch.config import load_config

        cache = self.__dict__.setdefault("_base_configs", {})
        if base not in cache:
            cache[base] = load_config([base], [])
        return cache[base]

    def _resources_for(self, size: str | None) -> Resources:
        merged = dict(self.default_resources)
        if size is not None:
            merged.update(self.size_resources.get(size, {}))
        for key in ("mem_gb", "gpu_mem_gb"):
            if merged.get(key) is not None:
                merged[key] = float(merged[key])
        return Resources(**merged)

    def _plan_point(self, point: dict[str, Any]) -> RunPlan:
        from ebt.sizes import SIZES
        from launch.config import load_config

        name = run_name(self.name, point)
        if None not in self.bases and point.get("kind") is None:
            raise ValueError(f"run '{name}': base is given per kind ({', '.join(map(str, self.bases))}); the point "
                             f"must set kind")
        base = self.base_for(point.get("kind"))
        pre: dict[str, Any] = {}
        base_cfg = self._base_config(base)
        size = point.get("size", base_cfg.model.size)
        if point.get("lr") is None and size in SIZES:
            pre["optim.lr"] = SIZES[size].peak_lr  # the size table's reference peak LR
        post: dict[str, Any] = {}
        for key, value in point.items():
            if key == "size":
                # The size's dims too: a base config that includes configs/model/<other>.yaml sets dims
                # explicitly, and explicit dims would otherwise win over model.size.
                spec = SIZES[value]
                dims = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "dim": spec.dim,
                        **self.size_dims.get(value, {})}  # size_dims: a stand-in's widths for the size
                post.update({"model.size": value, **{f"model.architecture.{k}": v for k, v in dims.items()}})
            elif key == "kind":
                post["model.kind"] = value
            elif key == "lr":
                if value is not None:
                    post["optim.lr"] = value
            elif key == "seed":
                post["trainer.seed"] = value
            elif key in BUDGET_AXES:
                continue
            else:
                post[key] = value
        resources = self._resources_for(size)
        fixed = {"name": name, "runs_dir": str(self.runs_dir)}
        per_size = self.size_overrides.get(size, {}) if size is not None else {}
        merged = {**pre, **self.overrides, **per_size, **post, **fixed}
        overrides = [f"{k}={_override_value(v)}" for k, v in merged.items()]
        try:
            cfg = load_config([base], overrides)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"run '{name}': {error}") from None
        # Batch arithmetic depends on the world size, which only the sweep knows.
        t = cfg.trainer
        world = resources.world_size
        if self.global_batch_size is not None:
            per_step = world * t.grad_accum_steps
            if self.global_batch_size % per_step:
                raise ValueError(f"run '{name}': global_batch_size {self.global_batch_size} is not divisible by "
                                 f"{world} ranks x {t.grad_accum_steps} accumulation steps")
            merged["trainer.micro_batch_size"] = self.global_batch_size // per_step
        gpu_plans: dict[str, Any] = {}
        planned_for = None
        if resources.gpus_per_node:
            gpu_plans, planned_for = self._gpu_plans(name, size, cfg, resources,
                                                     merged.get("trainer.micro_batch_size", t.micro_batch_size)
                                                     * t.grad_accum_steps)
            chosen = gpu_plans[planned_for]
            # The run computes exactly what the dry-run printed: the plan becomes explicit config.
            merged.update({"trainer.micro_batch_size": chosen.micro_batch_size,
                           "trainer.grad_accum_steps": chosen.grad_accum_steps,
                           "trainer.checkpointing": chosen.policy, "trainer.remat_chunk": chosen.remat_chunk})
        budget = [k for k in BUDGET_AXES if point.get(k) is not None]
        if budget:
            key = budget[0]
            value = point[key]
            if key == "steps":
                steps = int(value)
            else:
                micro = merged.get("trainer.micro_batch_size", t.micro_batch_size)
                accum = merged.get("trainer.grad_accum_steps", t.grad_accum_steps)
                tokens_per_step = micro * accum * world * cfg.model.architecture.context_length
                tokens = float(value)
                if key == "flops":
                    from ebt.flops import train_flops_per_token

                    tokens = float(value) / train_flops_per_token(cfg.model)
                steps = max(1, math.ceil(tokens / tokens_per_step))
            merged["trainer.max_steps"] = steps
        new_overrides = [f"{k}={_override_value(v)}" for k, v in merged.items()]
        if new_overrides != overrides:
            overrides = new_overrides
            try:
                cfg = load_config([base], overrides)
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(f"run '{name}': {error}") from None
        inputs = {"base": base_digests(base), "overrides": {k: merged[k] for k in sorted(merged)}}
        return RunPlan(name=name, point=dict(point), overrides=overrides, config=cfg, resources=resources,
                       inputs=inputs, gpu_plans=gpu_plans, planned_for=planned_for)

    def _gpu_plans(self, name: str, size: str | None, cfg: Any, resources: Resources,
                   per_rank: int) -> tuple[dict[str, Any], str]:
        """The memory plan on an H100 80GB and an H200 141GB (planning.plan_cuda, through the on-disk plan cache
        planning/cache.py: a plan is traced once per machine, with progress on stderr), plus the spec's own target
        (resources.gpu_mem_gb, default 80); a run that fits no micro-batch on its target is refused."""
        from planning import GPU_CAPACITY_BYTES, cached_plan_cuda

        targets = dict(GPU_CAPACITY_BYTES)
        target_gb = resources.gpu_mem_gb if resources.gpu_mem_gb is not None else DEFAULT_GPU_MEM_GB
        target = next((g for g in targets if g.endswith(f"-{target_gb:g}GB")), None)
        if target is None:
            target = f"GPU-{target_gb:g}GB"
            targets[target] = target_gb * 1e9
        strategy, world = cfg.distributed.strategy, resources.world_size
        plans: dict[str, Any] = {}
        for gpu, capacity in targets.items():
            try:
                plans[gpu] = cached_plan_cuda(cfg.model, per_rank, capacity, gpu, strategy, world,
                                              policy=cfg.trainer.checkpointing, remat_chunk=cfg.trainer.remat_chunk)
            except ValueError as error:
                plans[gpu] = str(error)
        if isinstance(plans[target], str):
            label = size or f"width {cfg.model.architecture.dim}"
            raise ValueError(f"run '{name}': size {label} does not fit {target_gb:g} GB per GPU: {plans[target]}; "
                             f"use distributed.strategy=fsdp, more GPUs or a larger gpu_mem_gb")
        return plans, target


def base_digests(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of the base config and of every file it pulls in with `include:` (the trainer's YAML merging)."""
    path = path.resolve()
    if path in seen or not path.is_file():
        return {}
    from launch.config import load_yaml

    out = {str(path): hashlib.sha256(path.read_bytes()).hexdigest()[:16]}
    try:
        data = load_yaml(path) or {}
    except ValueError:  # the trainer reports it when it reads the file
        return out
    includes = data.get("include", []) if isinstance(data, dict) else []
    for inc in [includes] if isinstance(includes, str) else includes or []:
        out.update(base_digests(path.parent / str(inc), seen + (path,)))
    return out


def _override_value(value: Any) -> str:
    """A YAML scalar/list that OmegaConf's dotlist parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------- run names
def _fmt_number(value: Any) -> str:
    """Short, injective enough for names: 2000000 -> 2M, 0.0012 -> 0.0012, 1.5e9 -> 1.5G."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    x = float(value)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div and (x / div) == float(f"{x / div:.6g}"):
            return f"{x / div:.6g}{suffix}"
    return f"{x:.6g}"


_NAME_PREFIX = {"lr": "lr", "tokens": "t", "flops": "f", "steps": "n", "seed": "s"}


def run_name(sweep: str, point: dict[str, Any]) -> str:
    """`<sweep>-<size>-<kind>-lr<lr>-t<tokens>-s<seed>[-<key><value>...]` from the point's own values only. A point
    that clears `model.size` (explicit widths below the size table) is named by its width:
    `w<model.architecture.dim>` in the size's place."""
    parts = [sweep]
    skip: set[str] = set()
    if "model.size" in point and point["model.size"] is None:
        skip.add("model.size")
        if point.get("model.architecture.dim") is not None:
            parts.append(f"w{_fmt_number(point['model.architecture.dim'])}")
            skip.add("model.architecture.dim")
    for axis in AXES:
        if axis not in point or point[axis] is None:
            continue
        value = point[axis]
        parts.append(f"{_NAME_PREFIX.get(axis, '')}{_fmt_number(value)}")
    for key in sorted(k for k in point if k not in AXES and k not in skip):
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{short}{_fmt_number(point[key])}")
    name = re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))
    if len(name) > MAX_NAME_LEN:
        digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME_LEN - 11]}-{digest}"
    return name


# ---------------------------------------------------------------------------------------------- loading
def _unknown_key(where: str, key: str, valid: tuple[str, ...] | list[str]) -> ValueError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(valid)}"
    return ValueError(f"{where}: unknown key '{key}'{hint}")


def _coerce_number(value: Any) -> Any:
    """A number written as a string (`"2.0e6"`, quoted, or from a YAML 1.1 writer) counts on a numeric axis."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


NUMERIC_AXES = ("lr", "tokens", "flops", "steps", "seed")


def _check_axis_value(where: str, key: str, value: Any) -> None:
    from ebt.config import KINDS
    from ebt.sizes import SIZES

    if key == "size":
        if value not in SIZES:
            close = difflib.get_close_matches(str(value), list(SIZES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(SIZES)}"
            raise ValueError(f"{where}: unknown size {value!r}{hint}")
    elif key == "kind":
        if value not in KINDS:
            raise ValueError(f"{where}: unknown kind {value!r}; expected one of {', '.join(KINDS)}")
    elif key == "lr":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{where}: lr must be a positive number or null, got {value!r}")
    elif key in BUDGET_AXES:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive number, got {value!r}")
    elif key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: seed must be an integer, got {value!r}")
    elif "." not in key:
        raise _unknown_key(where, key, list(AXES) + ["<section>.<key> (any trainer config key)"])


def _expand_points(raw_grid: Any, raw_runs: Any, path: Path) -> list[dict[str, Any]]:
    grid_points: list[dict[str, Any]] = [{}]
    if raw_grid is not None:
        if not isinstance(raw_grid, dict):
            raise ValueError(f"{path}: grid must be a mapping of axis -> list of values")
        axes = []
        for key, values in raw_grid.items():
            values = values if isinstance(values, list) else [values]
            if key in NUMERIC_AXES:
                values = [_coerce_number(v) for v in values]
            if not values:
                raise ValueError(f"{path}: empty grid: axis '{key}' has no values")
            for v in values:
                _check_axis_value(f"{path}: grid.{key}", str(key), v)
            axes.append([(str(key), v) for v in values])
        grid_points = [dict(combo) for combo in itertools.product(*axes)]
    run_points: list[dict[str, Any]] = [{}]
    if raw_runs is not None:
        if not isinstance(raw_runs, list):
            raise ValueError(f"{path}: runs must be a list of mappings")
        run_points = []
        for i, entry in enumerate(raw_runs):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: runs[{i}] must be a mapping, got {entry!r}")
            entry = {str(k): _coerce_number(v) if k in NUMERIC_AXES else v for k, v in entry.items()}
            for key, value in entry.items():
                _check_axis_value(f"{path}: runs[{i}].{key}", key, value)
            run_points.append(entry)
    if (raw_grid is None or not raw_grid) and (raw_runs is None or not raw_runs):
        raise ValueError(f"{path}: empty grid: give `grid:` axes and/or a `runs:` list")
    points = []
    for run in run_points:
        for g in grid_points:
            clash = sorted(set(run) & set(g))
            if clash:
                raise ValueError(f"{path}: '{clash[0]}' is set both in grid and in a runs entry ({run})")
            point = {**g, **run}
            budgets = [k for k in BUDGET_AXES if point.get(k) is not None]
            if len(budgets) > 1:
                raise ValueError(f"{path}: point {point} sets several budgets ({', '.join(budgets)}); pick one")
            points.append(point)
    return points


def _resources(raw: Any, path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    from ebt.sizes import SIZES

    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: resources must be a mapping of 'default' or a size -> settings")
    default: dict[str, Any] = {}
    per_size: dict[str, dict[str, Any]] = {}
    for key, settings in raw.items():
        where = f"{path}: resources.{key}"
        if key != "default" and key not in SIZES:
            close = difflib.get_close_matches(str(key), ["default", *SIZES], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected 'default' or one of {', '.join(SIZES)}"
            raise ValueError(f"{where}: unknown size {key!r}{hint}")
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a mapping")
        for name in settings:
            if name not in RESOURCE_KEYS:
                raise _unknown_key(where, name, RESOURCE_KEYS)
        clean = _given(_typed(Resources, settings, f"resources.{key}.", path), settings)
        for name, value in clean.items():
            if name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min") and value < 1:
                raise ValueError(f"{where}.{name}: must be >= 1, got {value}")
            if name in ("gpus_per_node", "mem_gb", "gpu_mem_gb") and value is not None and value < 0:
                raise ValueError(f"{where}.{name}: must be >= 0, got {value}")
        (default if key == "default" else per_size.setdefault(str(key), {})).update(clean)
    return default, per_size


def _slurm_settings(raw: Any, path: Path) -> SlurmSettings:
    if raw is None:
        return SlurmSettings()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: slurm must be a mapping")
    for key in raw:
        if key not in SLURM_KEYS:
            raise _unknown_key(f"{path}: slurm", key, SLURM_KEYS)
    # OmegaConf's words for a container of the wrong kind name no key; these two say what is expected.
    if raw.get("setup") is not None and not isinstance(raw["setup"], list):
        raise ValueError(f"{path}: slurm.setup must be a list of shell lines")
    if raw.get("sbatch") is not None and not isinstance(raw["sbatch"], dict):
        raise ValueError(f"{path}: slurm.sbatch must be a mapping of sbatch option -> value")
    slurm = _typed(SlurmSchema, raw, "slurm.", path)
    for key in ("array_parallelism", "max_requeues", "signal_delay_s"):
        value, low = getattr(slurm, key), 1 if key == "array_parallelism" else 0
        if value < low:
            raise ValueError(f"{path}: slurm.{key} must be an integer >= {low}, got {value!r}")
    return SlurmSettings(array_parallelism=slurm.array_parallelism, max_requeues=slurm.max_requeues,
                         signal_delay_s=slurm.signal_delay_s, setup=tuple(slurm.setup or ()),
                         sbatch=tuple(sorted((str(k), v) for k, v in (slurm.sbatch or {}).items())),
                         python=slurm.python)


def _read_spec(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec's mapping with `extends` resolved: the parent's keys, `overrides` and `slurm` merged key by key,
    every other key replaced by this file's. `base` paths are made absolute relative to the file naming them."""
    from launch.config import load_yaml

    if not path.is_file():
        raise FileNotFoundError(f"sweep spec not found: {path}")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for key in raw:
        if key not in SPEC_KEYS:
            raise _unknown_key(str(path), key, SPEC_KEYS)
    base = raw.get("base")
    if isinstance(base, str):
        raw["base"] = str((path.parent / base).resolve())
    elif isinstance(base, dict):
        raw["base"] = {k: str((path.parent / str(v)).resolve()) if isinstance(v, str) else v for k, v in base.items()}
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str):
        raise ValueError(f"{path}: extends must be the path of another sweep spec, got {parent_name!r}")
    parent_path = (path.parent / parent_name).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise ValueError(f"{path}: extends {parent_name} forms a cycle")
    if not parent_path.is_file():
        raise FileNotFoundError(f"{path}: extends: sweep spec not found: {parent_path}")
    parent = _read_spec(parent_path, seen + (path.resolve(),))
    merged = dict(parent)
    for key, value in raw.items():
        if key in MERGED_ON_EXTEND and isinstance(value, dict) and isinstance(parent.get(key), dict):
            merged[key] = {**parent[key], **value}
        else:
            merged[key] = value
    if "name" not in raw:
        merged["name"] = path.stem
    return merged


def _size_table(raw: Any, path: Path, key: str, check: Any) -> dict[str, dict[str, Any]]:
    """`size_overrides` / `size_dims`: size -> mapping, each entry checked (and converted) by
    `check(where, key prefix, entry, path)`."""
    from ebt.sizes import SIZES

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: {key} must be a mapping of size -> settings")
    out: dict[str, dict[str, Any]] = {}
    for size, settings in raw.items():
        where = f"{path}: {key}.{size}"
        if size not in SIZES:
            close = difflib.get_close_matches(str(size), list(SIZES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(SIZES)}"
            raise ValueError(f"{where}: unknown size {size!r}{hint}")
        if not isinstance(settings, dict):
            raise ValueError(f"{where}: expected a mapping")
        out[str(size)] = check(where, f"{key}.{size}.", settings, path)
    return out


def _check_size_overrides(where: str, prefix: str, settings: dict[str, Any], path: Path) -> dict[str, Any]:
    """Trainer keys, checked by the trainer's own loader at plan time."""
    for name in settings:
        if "." not in str(name):
            raise ValueError(f"{where}: '{name}' is not a trainer key (<section>.<key>)")
    return {str(k): v for k, v in settings.items()}


def _check_size_dims(where: str, prefix: str, settings: dict[str, Any], path: Path) -> dict[str, int]:
    for name in settings:
        if name not in SIZE_DIM_KEYS:
            raise _unknown_key(where, name, SIZE_DIM_KEYS)
    dims = _given(_typed(SizeDims, settings, prefix, path), settings)
    for name, value in dims.items():
        if value < 1:
            raise ValueError(f"{where}.{name}: expected a positive integer, got {value!r}")
    return dims


def load_spec(path: str | Path, *, sweep_dir: str | Path | None = None) -> SweepSpec:
    """Parse and validate a sweep YAML (structure and axis values; trainer keys are checked by `plan()`)."""
    path = Path(path)
    raw = _read_spec(path)
    # Scalars are converted (a quoted number for global_batch_size is fine); sections keep their raw values here.
    typed = _typed(SpecSchema, raw, "", path)
    raw.update({k: getattr(typed, k) for k in ("name", "runs_dir", "sweep_dir", "global_batch_size") if k in raw})
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{path}: name must be letters, digits, '.', '_' or '-', got {name!r}")
    if not raw.get("base"):
        raise ValueError(f"{path}: 'base' (the trainer config every run starts from) is required")
    from ebt.config import KINDS

    raw_base = raw["base"]
    if isinstance(raw_base, dict):
        bases: dict[str | None, Path] = {}
        for kind, file in raw_base.items():
            if kind not in KINDS:
                raise ValueError(f"{path}: base.{kind}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            if not isinstance(file, str):
                raise ValueError(f"{path}: base.{kind}: expected a trainer config path, got {file!r}")
            bases[str(kind)] = Path(file)
    elif isinstance(raw_base, str):
        bases = {None: Path(raw_base)}
    else:
        raise ValueError(f"{path}: base must be a trainer config path or a mapping kind -> path, got {raw_base!r}")
    for kind, base in bases.items():
        if not base.is_file():
            where = "base" if kind is None else f"base.{kind}"
            raise FileNotFoundError(f"{path}: {where}: base config not found: {base}")
    base = next(iter(bases.values()))
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{path}: overrides must be a mapping of trainer key -> value")
    gbs = raw.get("global_batch_size")
    if gbs is not None and gbs < 1:
        raise ValueError(f"{path}: global_batch_size must be a positive integer, got {gbs!r}")
    points = _expand_points(raw.get("grid"), raw.get("runs"), path)
    default_res, size_res = _resources(raw.get("resources"), path)
    runs_dir = Path(raw.get("runs_dir") or _base_runs_dir(base)).absolute()
    chosen_sweep_dir = sweep_dir or raw.get("sweep_dir") or Path("sweeps") / name
    return SweepSpec(name=name, path=path.resolve(), bases=bases, runs_dir=runs_dir,
                     sweep_dir=Path(chosen_sweep_dir).absolute(), points=points,
                     overrides={str(k): v for k, v in overrides.items()}, global_batch_size=gbs,
                     default_resources=default_res, size_resources=size_res,
                     slurm=_slurm_settings(raw.get("slurm"), path),
                     size_overrides=_size_table(raw.get("size_overrides"), path, "size_overrides",
                                                _check_size_overrides),
                     size_dims=_size_table(raw.get("size_dims"), path, "size_dims", _check_size_dims))


def _base_runs_dir(base: Path) -> str:
    from launch.config import load_config

    return load_config([base], []).runs_dir


def _resources_record(res: Resources) -> dict[str, Any]:
    # gpu_mem_gb came later: unset, it is left out so that sweeps recorded before it still match.
    return {k: v for k, v in dataclasses.asdict(res).items() if not (k == "gpu_mem_gb" and v is None)}


def plan_fingerprint(spec: SweepSpec, plans: list[RunPlan]) -> dict[str, Any]:
    """What must match for a resubmit to count as 'the same sweep'."""
    return {
        "name": spec.name,
        "runs": {p.name: {**p.inputs, "resources": _resources_record(p.resources)} for p in plans},
        "slurm": {k: v for k, v in dataclasses.asdict(spec.slurm).items() if k != "python"},
    }


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """A dotted path to the first differing leaf, with both values, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                return f"{where} added"
            if key not in new:
                return f"{where} removed"
            diff = first_difference(old[key], new[key], where)
            if diff:
                return diff
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                diff = first_difference(a, b, f"{prefix}[{i}]")
                if diff:
                    return diff
            return None
    if old != new:
        return f"{prefix}: {old!r} -> {new!r}"
    return None
