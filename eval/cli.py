"""`ebt eval` (held-out perplexity, System-2 grid, OOD gains) and `ebt report` (sweep -> scaling report).

The report's summary lines come from eval.report.summary_lines, so the CLI never prints an exponent or a
scaling-rate difference that the report withholds (issue 24)."""

from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _bool_list(text: str) -> list[bool]:
    out = []
    for v in _str_list(text):
        if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false values, got {v!r}")
        out.append(v.lower() in ("true", "1", "yes"))
    return out


def _report(args: argparse.Namespace) -> int:
    from eval.report import build_report, summary_lines

    result = build_report(args.inputs, args.out, loss_column=args.loss, n_boot=args.n_boot, seed=args.seed,
                          ci_level=args.ci, progress=not args.no_progress)
    for warning in result.warnings:
        print(f"ebt report: warning: {warning}", file=sys.stderr)
    # Every exponent and rate with its interval, or "not estimated" and why (eval.report.summary_lines).
    for line in summary_lines(result):
        print(line)
    print(f"wrote {args.out}/report.md, report.html, fits.json and {len(result.figures)} figure(s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from eval.evaluate import EvalSettings, run_eval

    if args.task is not None:
        return _eval_task(args)
    for option, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value is not None:
            raise ValueError(f"{option}: only used with --task")
    defaults = EvalSettings()
    settings = EvalSettings(steps=args.steps or defaults.steps, samples=args.samples,
                            selections=args.selection or defaults.selections,
                            accept_lower=args.accept_lower, noise=args.noise, seed=args.seed,
                            batch_size=args.batch_size, max_batches=args.max_batches, split=args.split,
                            tokenizer=args.tokenizer, device=args.device)
    run_eval(args.checkpoint, args.data, args.ood, settings, out_path=args.out, progress=not args.no_progress)
    return 0


def _eval_task(args: argparse.Namespace) -> int:
    """`ebt eval --task NAME [--data FILE.jsonl]`: a downstream task (eval/tasks/)."""
    from eval.tasks.runner import TaskSettings, run_task_eval

    # Options of the perplexity evaluation that a task has no use for are refused, not silently ignored.
    unused = [("--ood", bool(args.ood)), ("--split", args.split != "val"), ("--max-batches", args.max_batches != 0),
              ("--noise", args.noise != 0.0), ("--accept-lower", args.accept_lower != [False, True])]
    for option, given in unused:
        if given:
            raise ValueError(f"{option}: not used with --task (a task reads every example of --data; see --limit)")
    settings = TaskSettings(steps=args.steps, samples=args.samples or [1], selections=args.selection or ["min"],
                            seed=args.seed, batch_size=args.batch_size, limit=args.limit or 0,
                            max_new_tokens=args.max_new_tokens, tokenizer=args.tokenizer, device=args.device)
    run_task_eval(args.checkpoint, args.task, args.data, settings, out_path=args.out, progress=not args.no_progress)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser("report", help="scaling fits, System-2/OOD summaries and plots from a sweep",
                              description="Fit L(X) = E + A X^-alpha for X in parameters, tokens and FLOPs per "
                                          "model kind, compare EBT and Transformer++ scaling rates, and write "
                                          "report.md, report.html, PNGs and fits.json.")
    r.add_argument("inputs", nargs="+", metavar="SWEEP_OR_RUN_DIR",
                   help="sweep dirs (with results.csv from `ebt sweep collect`), results CSVs, run dirs, "
                        "or dirs of run dirs")
    r.add_argument("-o", "--out", required=True, help="output directory")
    r.add_argument("--loss", default="val_loss", choices=["val_loss", "train_loss"], help="loss to fit")
    r.add_argument("--n-boot", type=int, default=400, help="bootstrap draws per fit (0: no intervals)")
    r.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_report)

    from eval.tasks import TASKS

    e = subparsers.add_parser("eval", help="held-out perplexity; for EBTs a System-2 thinking grid; OOD gains; "
                                           "downstream tasks (--task)",
                              description="Exact per-token perplexity of a checkpoint on held-out data. For EBTs, "
                                          "every combination of thinking steps x samples x selection x "
                                          "accept-lower, with the mean energy per step. With --task, a downstream "
                                          "task's standard metrics instead: "
                                          + "; ".join(f"{name}: {task.description}" for name, task in TASKS.items()))
    e.add_argument("--checkpoint", required=True, help="checkpoint dir, `ebt export` dir or run dir (newest)")
    e.add_argument("--task", default=None, metavar="|".join(TASKS),
                   help="a downstream task instead of perplexity; --data is then a jsonl file in the dataset's "
                        "public format (default: the dataset from the Hugging Face hub)")
    e.add_argument("--limit", type=int, default=None, help="--task: the first N examples only")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="--task gsm8k/squad: generation budget (default 256 / 32, within the model's context)")
    e.add_argument("--data", default=None,
                   help="held-out data: a shards dir, or a source (embedded, paths/globs, hf:NAME); default: the "
                        "checkpoint's training data. With --task: FILE.jsonl")
    e.add_argument("--ood", action="append", default=[], metavar="SOURCE",
                   help="another source to evaluate on (repeatable), e.g. prose for a code-trained model")
    e.add_argument("--split", default="val", choices=["val", "train", "all"],
                   help="split of --data; all: every document (OOD sources always use every document)")
    e.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (needed only when the checkpoint has no data config, e.g. an export dir)")
    e.add_argument("--steps", type=_int_list, default=None,
                   help="thinking steps, e.g. 1,2,4,8 (default 1,2,4,8; with --task: the trained steps)")
    e.add_argument("--samples", type=_int_list, default=None,
                   help="chains per token, e.g. 1,2,4 (default 1,2,4; just 1 when every chain would be the same: "
                        "init_logit_std 0 and no --noise; with --task: 1)")
    e.add_argument("--selection", type=_str_list, default=None,
                   help="sample selection rules (default min,max_gap; with --task: min)")
    e.add_argument("--accept-lower", type=_bool_list, default=[False, True], help="e.g. false,true")
    e.add_argument("--noise", type=float, default=0.0, help="Langevin noise scale during thinking")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-batches", type=int, default=0,
                   help="batches per source (0: the whole split); the first --max-batches x --batch-size windows")
    e.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda (starts drawn on the CPU)")
    e.add_argument("--seed", type=int, default=0, help="seed of the initial candidates (results are deterministic)")
    e.add_argument("--out", default=None,
                   help="JSON output path (default: <checkpoint>/eval.json; with --task: <checkpoint>/eval-TASK.json)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar with ETA on a terminal, else a line every ~10%% of a source)")
    e.set_defaults(func=_eval)
