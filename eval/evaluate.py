"""`ebt eval`: held-out perplexity of a checkpoint; for EBTs a System-2 thinking grid per data source.

Every grid cell starts a sequence from the same initial candidates, so differences between cells are paired
comparisons, not start noise, and the whole grid is reproducible for a seed. Sample m of a sequence starts from
a draw keyed by (seed, m, the sequence's tokens) (ebt.starts.eval_starts: a counter-based draw computed
on the device, the same on CPU and GPU), so the
one-sample cells reuse the first chain of the many-sample cells, results do not depend on --batch-size, and
at --seed 0 the System-1 cell scores each sequence from the start the trainer's validation gives it: on the
same windows its loss is the trainer's val_loss. (--noise is drawn per batch, so it does depend on batching.)

The thinking gain of a cell is its perplexity reduction relative to the System-1 setting the model was
trained with (its evaluation steps, repeated landscapes included, one sample, no accept-lower), in percent of
that perplexity.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebt.inference import SELECTIONS
from eval.perplexity import EnergySums, TokenNLL
from eval.sweep_data import EVAL_SCHEMA
from fsutil import atomic_write_text
from fsutil.progress import Progress

DEFAULT_SAMPLES = (1, 2, 4)


@dataclass
class EvalSettings:
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # None: DEFAULT_SAMPLES, or one sample when every chain would be the same (run_eval says so)
    samples: list[int] | None = None
    selections: list[str] = field(default_factory=lambda: ["min", "max_gap"])
    accept_lower: list[bool] = field(default_factory=lambda: [False, True])
    noise: float = 0.0
    seed: int = 0
    batch_size: int = 8
    max_batches: int = 0  # 0: the whole split
    split: str = "val"  # of --data; "all": every document (OOD sources always use all)
    tokenizer: str | None = None  # needed when the checkpoint carries no data config (an `ebt export` dir)
    device: str = "cpu"

    def validate(self) -> None:
        if not self.steps or min(self.steps) < 0:
            raise ValueError(f"--steps: need non-negative step counts, got {self.steps}")
        if self.samples is not None and (not self.samples or min(self.samples) < 1):
            raise ValueError(f"--samples: need counts >= 1, got {self.samples}")
        for s in self.selections:
            if s not in SELECTIONS:
                raise ValueError(f"--selection: unknown selection {s!r}; expected one of {', '.join(SELECTIONS)}")
        if not self.selections or not self.accept_lower:
            raise ValueError("--selection and --accept-lower need at least one value each")
        if self.batch_size < 1 or self.max_batches < 0:
            raise ValueError(f"--batch-size must be >= 1 and --max-batches >= 0, got {self.batch_size}, "
                             f"{self.max_batches}")
        if self.noise < 0:
            raise ValueError(f"--noise must be >= 0, got {self.noise}")
        if self.split not in ("val", "train", "all"):
            raise ValueError(f"--split must be val, train or all, got {self.split!r}")


@dataclass(frozen=True)
class Cell:
    steps: int
    samples: int
    selection: str  # "none" with one sample: there is nothing to select
    accept_lower: bool

    def key(self) -> tuple:
        return (self.steps, self.samples, self.selection, self.accept_lower)


def grid_cells(settings: EvalSettings, trained_steps: int) -> list[Cell]:
    """Every distinct cell of the grid, plus the System-1 baseline (trained steps, one sample)."""
    cells: dict[tuple, Cell] = {}
    for steps in settings.steps:
        for samples in settings.samples or DEFAULT_SAMPLES:
            # One sample leaves nothing to select; zero steps leave no proposal to accept or reject.
            for selection in ["none"] if samples == 1 else settings.selections:
                for accept in sorted(set(settings.accept_lower)) if steps > 0 else [False]:
                    cell = Cell(steps, samples, selection, accept)
                    cells.setdefault(cell.key(), cell)
    baseline = Cell(trained_steps, 1, "none", False)
    cells.setdefault(baseline.key(), baseline)
    return sorted(cells.values(), key=Cell.key)


@dataclass
class SourceSpec:
    name: str
    data: str
    split: str
    ood: bool
    cfg: Any  # data_pipeline.DataConfig


def _batch_generator(seed: int, batch_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


def _starts(batch: torch.Tensor, model_cfg, seed: int, samples: int, dtype: torch.dtype) -> torch.Tensor:
    """Initial candidates [B, samples, S, V] of a CPU batch [B, S+1]: sample m of each sequence keyed by
    (seed, m, the sequence), as the trainer's validation keys sample 0 (ebt.starts.eval_starts)."""
    from ebt.starts import eval_starts

    shape = (batch.shape[0], samples, batch.shape[1] - 1, model_cfg.architecture.vocab_size)
    if model_cfg.thinking.init_logit_std == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.stack([eval_starts(batch, seed, m, model_cfg.architecture.vocab_size,
                                    model_cfg.thinking.init_logit_std, dtype)
                        for m in range(samples)], dim=1)


def evaluate_batches(model, model_cfg, batches, settings: EvalSettings, progress=None, task=None) -> dict[str, Any]:
    """Perplexity (Transformer++) or the thinking grid (EBT) over an iterable of LongTensor[B, S+1]."""
    settings.validate()
    is_ebt = model_cfg.kind == "ebt"
    cells = grid_cells(settings, model_cfg.thinking.eval_steps) if is_ebt else []
    ignore = model_cfg.loss.ignore_index
    nll = {c.key(): TokenNLL(ignore) for c in cells} if is_ebt else {"plain": TokenNLL(ignore)}
    energies = {c.key(): EnergySums() for c in cells}
    max_samples = max((c.samples for c in cells), default=1)
    n_batches = 0
    model.eval()
    for index, batch in enumerate(batches):
        if settings.max_batches and index >= settings.max_batches:
            break
        device = model.alpha_raw.device if is_ebt else next(model.parameters()).device
        cpu_batch = batch.cpu()
        batch = batch.to(device)
        tokens, targets = batch[:, :-1], batch[:, 1:]
        n_batches += 1
        if not is_ebt:
            with torch.no_grad():
                logits, _ = model.logits(tokens)
            nll["plain"].add(logits, targets)
            if progress is not None:
                progress.advance(task)
            continue
        starts = _starts(cpu_batch, model_cfg, settings.seed, max_samples, model.alpha_raw.dtype).to(device)
        for cell in cells:
            noise_gen = _batch_generator(settings.seed + 1, index, device)
            result = model.think(tokens, cell.steps, cell.samples,
                                 "min" if cell.selection == "none" else cell.selection, cell.accept_lower,
                                 settings.noise, generator=noise_gen, starts=starts[:, :cell.samples])
            nll[cell.key()].add(result.logits, targets)
            energies[cell.key()].add(result.mean_energy_per_step, targets.numel())
            if progress is not None:
                progress.advance(task)
    if n_batches == 0:
        raise ValueError("the data yielded no batch: the split is empty or shorter than one context window")
    out: dict[str, Any] = {"batches": n_batches, "tokens": next(iter(nll.values())).tokens}
    if not is_ebt:
        out.update(plain={"loss": nll["plain"].loss, "ppl": nll["plain"].ppl}, grid=[], base=None, best=None,
                   gain_pct=None)
        return out
    grid = [{"steps": c.steps, "samples": c.samples, "selection": c.selection, "accept_lower": c.accept_lower,
             "loss": nll[c.key()].loss, "ppl": nll[c.key()].ppl, "mean_energy_per_step": energies[c.key()].means()}
            for c in cells]
    base = next(g for g in grid if (g["steps"], g["samples"], g["selection"], g["accept_lower"])
                == (model_cfg.thinking.eval_steps, 1, "none", False))
    for g in grid:
        g["gain_pct"] = 100.0 * (base["ppl"] - g["ppl"]) / base["ppl"]
    best = min(grid, key=lambda g: g["ppl"])
    out.update(plain=None, grid=grid, base=base, best=best, gain_pct=best["gain_pct"])
    return out


# ---------------------------------------------------------------------------------------------- data sources


def _check_shards_vocab(shards: str, manifest: dict, model_vocab: int) -> None:
    vocab = manifest.get("tokenizer", {}).get("vocab_size")
    if vocab is not None and vocab != model_vocab:
        raise ValueError(f"shards {shards} were tokenized with a {vocab}-piece vocabulary but the model's "
                         f"vocab_size is {model_vocab}: not this model's data")


def resolve_sources(checkpoint: Path, data: str | None, ood: list[str], settings: EvalSettings,
                    model_vocab: int | None = None) -> list[SourceSpec]:
    from data_pipeline import DataConfig
    from data_pipeline.prepare import read_manifest
    from launch.run_dir import data_config, find_tokenizer

    train_cfg = data_config(checkpoint)
    if data is None and train_cfg is None:
        raise ValueError("the checkpoint has no data config (an `ebt export` dir?): pass --data")
    base = dataclasses.asdict(train_cfg) if train_cfg is not None else {}
    base["progress"] = False
    tokenizer = find_tokenizer(checkpoint, settings.tokenizer, model_vocab=model_vocab)
    specs = []
    if data is None:
        cfg = DataConfig(**{**base, "tokenizer": tokenizer})
        specs.append(_spec(f"{cfg.source} ({settings.split})", cfg.source, settings.split, False, cfg))
    elif Path(data).is_dir() and (manifest := read_manifest(data)) is not None:
        if model_vocab is not None:
            _check_shards_vocab(data, manifest, model_vocab)
        cfg = DataConfig(**{**base, "mode": "shards", "shards_dir": data, "tokenizer": tokenizer})
        specs.append(_spec(f"{Path(data).name} ({settings.split})", data, settings.split, False, cfg))
    else:
        cfg = DataConfig(**{**base, "source": data, "mode": "stream", "tokenizer": tokenizer})
        specs.append(_spec(f"{_short(data)} ({settings.split})", data, settings.split, False, cfg))
    for source in ood:
        # The whole OOD source is unseen by the model, so every document counts (split "all").
        cfg = DataConfig(**{**base, "source": source, "mode": "stream", "tokenizer": tokenizer})
        specs.append(_spec(_short(source), source, "all", True, cfg))
    return specs


def _spec(name: str, data: str, split: str, ood: bool, cfg) -> SourceSpec:
    if split == "all":
        cfg = dataclasses.replace(cfg, val_fraction=0.0)
        if cfg.mode == "shards":
            raise ValueError("--split all needs a source, not a shards dir (shards hold fixed train/val splits)")
    return SourceSpec(name, data, "train" if split == "all" else split, ood, cfg)


def _short(source: str) -> str:
    name = source.split(",")[0].rstrip("/")
    return Path(name).name or name


def _loader(spec: SourceSpec, context_length: int, batch_size: int):
    import data_pipeline

    return data_pipeline.build_eval_loader(spec.cfg, split=spec.split, context_length=context_length,
                                           micro_batch_size=batch_size)


# ---------------------------------------------------------------------------------------------- entry point


def run_eval(checkpoint: str | Path, data: str | None, ood: list[str], settings: EvalSettings, *,
             out_path: str | Path | None = None, progress: bool = True, print_table: bool = True) -> dict[str, Any]:
    from ebt.flops import parameter_count
    from launch.run_dir import load_model, resolve_checkpoint

    settings.validate()
    torch.set_flush_denormal(True)
    torch.manual_seed(settings.seed)
    path = resolve_checkpoint(checkpoint)
    model, model_cfg = load_model(path, device=settings.device)
    specs = resolve_sources(path, data, ood, settings, model_vocab=model_cfg.architecture.vocab_size)
    # Every source is opened before any is evaluated: a glob that matches nothing, a missing path or shards of
    # another tokenizer fail at once, not after the in-distribution evaluation.
    loaders = [_open(spec, model_cfg.architecture.context_length, settings.batch_size) for spec in specs]
    is_ebt = model_cfg.kind == "ebt"
    settings = _resolve_samples(settings, model_cfg) if is_ebt else settings
    n_cells = len(grid_cells(settings, model_cfg.thinking.eval_steps)) if is_ebt else 1
    results = []
    with EvalProgress(enabled=progress) as bar:
        for spec, loader in zip(specs, loaders, strict=True):
            total = len(loader) if hasattr(loader, "__len__") else None
            if settings.max_batches:
                total = settings.max_batches if total is None else min(total, settings.max_batches)
            task = bar.start(f"eval {spec.name}", total, n_cells)
            try:
                res = evaluate_batches(model, model_cfg, loader, settings, bar, task)
            except ValueError as error:
                raise ValueError(f"source {spec.data!r}: {error}") from None
            bar.finish(task)
            results.append({"name": spec.name, "data": spec.data, "split": spec.split, "ood": spec.ood, **res})
    report = {
        "schema": EVAL_SCHEMA, "checkpoint": str(path), "run": _run_name(path), "kind": model_cfg.kind,
        "size": model_cfg.size, "n_params": parameter_count(model_cfg),
        "mcmc_steps": model_cfg.thinking.eval_steps if is_ebt else None,  # the System-1 steps (repeats included)
        "settings": dataclasses.asdict(settings), "sources": results,
    }
    out = Path(out_path) if out_path else path / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1, allow_nan=True))
    if print_table:
        _print_tables(report)
        print(f"wrote {out}")
    return report


def _open(spec: SourceSpec, context_length: int, batch_size: int):
    try:
        return _loader(spec, context_length, batch_size)
    except (ValueError, FileNotFoundError) as error:
        option = "--ood" if spec.ood else "--data"
        raise type(error)(f"{option} {spec.data}: {error}") from None


def _resolve_samples(settings: EvalSettings, model_cfg) -> EvalSettings:
    """The sample counts to evaluate; with identical chains the default grid keeps one sample (said once)."""
    same_chain = model_cfg.thinking.init_logit_std == 0 and settings.noise == 0
    if settings.samples is None:
        if same_chain:
            print("ebt eval: note: the checkpoint's model.thinking.init_logit_std is 0 and --noise is 0, so every "
                  "sample of a cell would be the same chain; evaluating 1 sample only (pass --noise to compare "
                  "samples, or --samples to evaluate more anyway)", file=sys.stderr)
            return dataclasses.replace(settings, samples=[1])
        return dataclasses.replace(settings, samples=list(DEFAULT_SAMPLES))
    if same_chain and max(settings.samples) > 1:
        # Every chain then starts from the same uniform logits and follows the same deterministic descent.
        print("ebt eval: warning: the checkpoint's model.thinking.init_logit_std is 0 and --noise is 0, so all "
              "samples of a cell are the same chain and the samples/selection columns repeat one result; pass --noise "
              "(or train with init_logit_std > 0) to compare samples", file=sys.stderr)
    return settings


class EvalProgress:
    """Progress of `ebt eval` and the downstream tasks on stderr, through the one progress helper
    (fsutil/progress.py): a rich bar with elapsed time and ETA on a terminal (gone when done: the tables follow);
    elsewhere (a Slurm log, a pipe, a file) a plain "ebt eval: ..." line every total/lines_per_source batches
    (every lines_per_source batches when the total is unknown), after `interval_s` seconds without one, and at
    the end of each source.

    Units are grid cells of one batch (`advance` per cell, as evaluate_batches calls it); lines count batches.
    """

    def __init__(self, enabled: bool = True, stream=None, lines_per_source: int = 10,
                 interval_s: float = 60.0, force_terminal: bool | None = None) -> None:
        self.display = Progress(stream=stream, enabled=enabled, force_terminal=force_terminal, prefix="ebt eval: ",
                                lines=lines_per_source, interval_s=interval_s, transient=True)
        self.enabled, self.live = enabled, self.display.live

    def __enter__(self) -> EvalProgress:
        self.display.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.display.__exit__(*exc)

    def start(self, name: str, total_batches: int | None, cells_per_batch: int, unit: str = "batches") -> int:
        """A new source of `total_batches` batches (None: unknown; `unit` names them in the lines, e.g.
        "examples" for a downstream task); returns its task id."""
        return self.display.add(name, total_batches, unit=unit, scale=cells_per_batch)

    def advance(self, task: int, advance: int = 1) -> None:
        self.display.advance(task, advance)

    def finish(self, task: int) -> None:
        """The end of a source: a last line unless the last batch already printed one."""
        self.display.finish(task)


def _run_name(path: Path) -> str:
    # checkpoints live at <run>/checkpoints/step_N; an export dir is its own name
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Wide enough for the grid table without wrapping when stdout is a file or a narrow pipe.
    console = Console(width=max(Console().width, 100))
    for src in report["sources"]:
        title = f"{report['run']} on {src['name']}{' (OOD)' if src['ood'] else ''}: {src['tokens']:,} tokens"
        if src["plain"] is not None:
            table = Table("loss", "perplexity", title=title)
            table.add_row(f"{src['plain']['loss']:.4f}", f"{src['plain']['ppl']:.3f}")
            console.print(table)
            continue
        table = Table("steps", "samples", "select", "acc.lower", "loss", "ppl", "gain %", "energy 0 -> last",
                      title=title)
        for g in src["grid"]:
            e = g["mean_energy_per_step"]
            table.add_row(str(g["steps"]), str(g["samples"]), g["selection"], "yes" if g["accept_lower"] else "no",
                          f"{g['loss']:.4f}", f"{g['ppl']:.5g}", f"{g['gain_pct']:+.2f}",
                          f"{e[0]:.3g} -> {e[-1]:.3g}" if e else "")
        console.print(table)
        best = src["best"]
        console.print(f"best: steps={best['steps']} samples={best['samples']} {best['selection']}"
                      f"{' accept-lower' if best['accept_lower'] else ''}: perplexity {best['ppl']:.3f}, "
                      f"thinking gain {src['gain_pct']:+.2f}% vs. {report['mcmc_steps']} trained steps")
