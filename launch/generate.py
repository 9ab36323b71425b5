"""`ebt generate`: continue a prompt with a trained EBT or Transformer++, streaming the text as it is produced.

The checkpoint may be a run dir (its newest valid checkpoint), a checkpoint dir or an `ebt export` dir; the
tokenizer is the one it was trained with (launch/run_dir.py), so no path beyond the checkpoint is needed.
The text side is launch/textgen.py (TextModel), the thinking settings ebt/generation.py; nothing here imports eval.
The text goes to stdout token by token; the throughput goes to stderr at the end, so `> file` keeps only text.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MAX_NEW_TOKENS = 64


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ebt.generation import Thinking, check_device
    from launch.checkpoint import load_model, resolve_checkpoint
    from launch.run_dir import find_tokenizer
    from launch.textgen import TextModel

    _check_args(args)
    check_device("--device", args.device)
    path = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(path, device=args.device)
    if cfg.kind != "ebt":
        for option, value in (("--steps", args.steps), ("--samples", args.samples)):
            if value is not None:
                raise ValueError(f"{option}: a Transformer++ does not think; it is only used with an EBT checkpoint")
    tokenizer = find_tokenizer(path, args.tokenizer, model_vocab=cfg.architecture.vocab_size)
    torch.set_flush_denormal(True)
    thinking = Thinking(steps=args.steps, samples=args.samples or 1, seed=args.seed)
    if cfg.kind == "ebt" and cfg.thinking.init_logit_std == 0 and thinking.samples > 1:
        print("ebt generate: note: the checkpoint's model.thinking.init_logit_std is 0, so all --samples chains "
              "start from the same logits and agree; one sample gives the same text", file=sys.stderr)
    text_model = TextModel(model, cfg, tokenizer, thinking)
    prompt = text_model.encode(args.prompt)
    # The prompt follows the end-of-document token (TextModel.generate), as every document in training does.
    room = cfg.architecture.context_length - 1 - len(prompt)
    if room < 1:
        raise ValueError(f"--prompt: {len(prompt)} tokens leave no room in the model's context of "
                         f"{cfg.architecture.context_length} tokens (model.architecture.context_length); shorten the "
                         "prompt")
    wanted = args.max_new_tokens if args.max_new_tokens is not None else min(DEFAULT_MAX_NEW_TOKENS, room)
    if wanted > room:
        raise ValueError(f"--max-new-tokens: {wanted} does not fit: the prompt is {len(prompt)} tokens and the "
                         f"model's context {cfg.architecture.context_length} (model.architecture.context_length); "
                         f"at most {room}")

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    show(args.prompt)
    start = time.perf_counter()
    # The checks above leave TextModel.generate nothing to shrink: `wanted` tokens follow the whole prompt.
    _, count = text_model.generate(prompt, wanted, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                               on_text=show)
    seconds = time.perf_counter() - start
    show("\n")
    how = f"{text_model.steps} thinking steps x {thinking.samples} sample(s)" if cfg.kind == "ebt" else "Transformer++"
    ended = " (end of document)" if count < wanted else ""
    print(f"ebt generate: {count} tokens in {seconds:.2f} s: {count / max(seconds, 1e-9):.1f} tokens/s "
          f"({how}, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}){ended}",
          file=sys.stderr)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: must lie in (0, 1], got {args.top_p}")
    if args.top_p is not None and args.temperature == 0:
        raise ValueError("--top-p: only used when sampling; pass --temperature > 0 as well")
    if args.steps is not None and args.steps < 0:
        raise ValueError(f"--steps: must be >= 0, got {args.steps}")
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples: must be >= 1, got {args.samples}")


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser("generate", help="continue a prompt with a trained EBT or Transformer++ (streams)",
                              description="Continue --prompt with a checkpoint, printing each token as it is "
                                          "produced, then the tokens/s on stderr. The tokenizer is found from the "
                                          "checkpoint (its run dir or export keeps a copy).")
    g.add_argument("--checkpoint", required=True, help="run dir (newest valid checkpoint), checkpoint dir or export")
    g.add_argument("--prompt", required=True, help="text to continue (it starts a document)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}, or what the context leaves); stops "
                        "early at the end-of-document token")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--steps", type=int, default=None, help="EBT thinking steps per token (default: the trained ones)")
    g.add_argument("--samples", type=int, default=None,
                   help="EBT chains per token; the lowest final energy wins (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the EBT's starting candidates and of sampling")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's own)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    g.set_defaults(func=_generate)
