"""What re-running `ebt train` on an existing run dir may do, decided before the trainer starts.

- A finished run (its metrics end with the final validation row at trainer.max_steps) is reported and left
  alone: no model is built, nothing is evaluated again, nothing is written.
- The LR is a function of the config and the step (launch/schedule.py), so a changed trainer.max_steps,
  optim.warmup_steps, optim.min_lr_scale or optim.lr would silently bend the rest of the run onto another
  schedule than the one it started on. Such a change is refused, naming the key (old -> new), unless it is
  accepted explicitly (--allow-schedule-change); then the new values are simply the ones the LR is computed
  from, from the resumed step on (the LR so far is history).
- Checkpoints saved by another number of processes are refused with the count: the trainer would find none of
  them usable, start over and prune them.
- A run dir with checkpoints or metrics but no checkpoint that verifies is refused too (it would start over and
  overwrite them); `--restart` moves it aside (`move_aside`, nothing deleted) and trains from scratch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.checkpoint import MANIFEST, STEP_RE, verify
from launch.config import TrainConfig, check_resume_compatible, config_to_dict, load_saved_config

ALLOW_FLAG = "--allow-schedule-change"


@dataclass
class SavedRun:
    checkpoint: Path  # the newest valid checkpoint
    step: int
    world_size: int | None
    config: TrainConfig  # the config it was trained with
    reshardable: bool = False  # sharded (fsdp, DCP) checkpoints resume at any world size


def newest_checkpoint(cfg: TrainConfig) -> SavedRun | None:
    """The newest checkpoint of the run dir that passes its manifest, whatever world size saved it."""
    import json

    root = cfg.run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name))), reverse=True)
    for step in steps:
        path = root / f"step_{step}"
        if _verified(path):
            manifest = json.loads((path / MANIFEST).read_text())
            return SavedRun(path, step, manifest.get("world_size"), load_saved_config(path / "config.yaml"),
                            bool(manifest.get("reshardable")))
    return None


_VERIFIED: set[tuple[str, int]] = set()


def _verified(path: Path) -> bool:
    """The cheap check of `path` (manifest, every file present at its size; no hashing), remembered per manifest.

    This runs on every rank before training starts, only to read the saved config and step; the trainer then
    hashes each rank's own files before it loads anything (launch/checkpoint.py), and falls back together with
    the other ranks past a checkpoint whose bytes are bad."""
    try:
        key = (str(path.resolve()), (path / MANIFEST).stat().st_mtime_ns)
    except OSError:
        return False
    if key not in _VERIFIED and verify(path, hashed=lambda rel: False) is None:
        _VERIFIED.add(key)
    return key in _VERIFIED


def schedule_changes(saved: TrainConfig, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every setting of the LR schedule that differs. optim.lr compares the peak LR
    actually used (None means the size table's), so spelling out the default is no change."""
    pairs = [("trainer.max_steps", saved.trainer.max_steps, cfg.trainer.max_steps),
             ("optim.warmup_steps", saved.optim.warmup_steps, cfg.optim.warmup_steps),
             ("optim.min_lr_scale", saved.optim.min_lr_scale, cfg.optim.min_lr_scale),
             ("optim.lr", saved.peak_lr, cfg.peak_lr)]
    return [(key, old, new) for key, old, new in pairs if not _same(old, new)]


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, float) or isinstance(new, float):
        return math.isclose(float(old), float(new), rel_tol=1e-12, abs_tol=0.0)
    return old == new


def check_resume(cfg: TrainConfig, world_size: int, allow_schedule_change: bool = False) -> SavedRun | None:
    """Refuse (ValueError, one line) a resume that would not continue the saved run; returns it (None: a new
    run, or checkpoint.resume=false, which the trainer handles)."""
    if not cfg.checkpoint.resume:
        return None
    saved = newest_checkpoint(cfg)
    if saved is None:
        _refuse_starting_over(cfg)
        return None
    world_changed = saved.world_size is not None and saved.world_size != world_size
    if world_changed and not saved.reshardable:
        raise ValueError(f"{saved.checkpoint} was saved by {saved.world_size} process(es) but this launch has "
                         f"{world_size}: its per-rank data-loader and RNG state cannot be split differently; resume "
                         f"it with {saved.world_size} process(es) or pick a new name=")
    # A resharded resume may change the per-rank batch with the world size (check_resume_compatible says how).
    check_resume_compatible(config_to_dict(saved.config), cfg, cfg.run_dir, **({"world_changed": True}
                                                                                  if world_changed else {}))
    changes = schedule_changes(saved.config, cfg)
    if changes and not allow_schedule_change:
        key, old, new = changes[0]
        more = f" (and {', '.join(k for k, _, _ in changes[1:])})" if len(changes) > 1 else ""
        raise ValueError(f"config key '{key}': {old!r} -> {new!r}{more} changes the LR schedule of the run in "
                         f"{cfg.run_dir} (at step {saved.step}); pass {ALLOW_FLAG} to continue it on the new "
                         "schedule, or pick a new name=")
    return saved


RESTART_FLAG = "--restart"


def _refuse_starting_over(cfg: TrainConfig) -> None:
    """A run dir with checkpoints or metrics rows but no checkpoint that verifies (every manifest lost in a copy
    that dropped small files, say) would train from step 0 and overwrite both: refuse, saying how to start over
    on purpose. A run finished without a final checkpoint (checkpoint.save_final=false) is not refused here."""
    from fsutil import read_metrics_rows

    root = cfg.run_dir / "checkpoints"
    steps = sorted((int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name))), reverse=True) \
        if root.is_dir() else []
    rows = read_metrics_rows(cfg.run_dir)
    if not steps and not rows:
        return
    if finished(cfg) is not None:
        return
    if steps:
        newest = root / f"step_{steps[0]}"
        what = (f"{len(steps)} checkpoint(s), none usable (newest {newest}: {verify(newest, hashed=lambda rel: False)})"
                + (f", and metrics.jsonl up to step {rows[-1].get('step')}" if rows else ""))
    else:
        what = f"metrics.jsonl up to step {rows[-1].get('step')} but no checkpoint"
    raise ValueError(f"{cfg.run_dir} holds {what}: nothing to resume from, and training from step 0 would overwrite "
                     f"it; to start over pass {RESTART_FLAG} (moves {cfg.run_dir} aside to "
                     f"{cfg.run_dir.name}.old-<time>, deleting nothing), or pick a new name=")


def move_aside(run_dir: Path) -> Path | None:
    """`--restart`: rename the run dir to `<name>.old-<YYYYmmdd-HHMMSS>` beside it (a free name; never deleting
    anything), so the run starts from nothing. Returns the new path; None when there was no run dir. The caller
    holds the run dir's lock (launch/run_lock.py), which sits beside the run dir and so stays held."""
    import time

    if not run_dir.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}" + (f"-{n}" if n else ""))
        if not target.exists():
            break
    else:
        raise ValueError(f"{RESTART_FLAG}: no free name to move {run_dir} aside to ({target} and 999 more exist)")
    # rename(2) on one filesystem: atomic, nothing is copied or deleted. The target was free just above, and the
    # held lock keeps other trainers of this name away.
    os.rename(run_dir, target)
    return target


def finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The final validation row when the run dir holds a run finished at (or past) trainer.max_steps.

    The trainer writes that row last, after its final checkpoint, and cuts metrics.jsonl back to the resumed
    step on every restart, so the row ends the file exactly when the last attempt ran to the end. With
    checkpoint.save_final the final checkpoint must also still be valid: if it was lost or damaged, running
    again resumes from the one before and restores it."""
    from fsutil import read_metrics_rows

    if not cfg.checkpoint.resume or not (cfg.run_dir / "metrics.jsonl").is_file():
        return None
    rows = read_metrics_rows(cfg.run_dir)
    if not rows or not rows[-1].get("final") or int(rows[-1].get("step", -1)) < cfg.trainer.max_steps:
        return None
    if cfg.checkpoint.save_final:
        saved = newest_checkpoint(cfg)
        if saved is None or saved.step != int(rows[-1]["step"]):
            return None
    return rows[-1]


def final_line(row: dict[str, Any]) -> str:
    """The line `ebt train` ends a run with."""
    ppl = row.get("val_ppl")
    if ppl is None:
        return "training finished"
    return (f"validation perplexity: {ppl:.3f} (loss {row['val_loss']:.4f}) after {row['step']} steps, "
            f"{row['tokens']:,} tokens")

