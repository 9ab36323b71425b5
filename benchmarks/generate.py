"""Generation throughput: an EBT (1 and 3 thinking steps, 1 and 4 samples) against its Transformer++ twin, in
tokens/s, at the quickstart size (configs/train/quickstart.yaml: 4xs, context 64, vocab 2048).

Random weights built by ebt.build_model from the quickstart config (and configs/recipes/transformer.yaml for the
twin): generation's cost does not depend on what the weights learned, once denormals are flushed, as `ebt
generate` does. Tokenizer-free: ebt.inference.generate on token tensors, greedy, from a fixed prompt after the
end-of-document token, every setting once per round and the rounds alternated, so a change in the machine's load
falls on every setting alike. The EBT at its trained steps (ModelConfig.eval_steps) is the one compared with the
Transformer++ (issue 23's target: within 2x).

    python -m benchmarks.generate            # writes benchmarks/results/generate.json and the README table
    python -m benchmarks.generate --baseline-tree /tmp/before   # also an earlier checkout, rounds interleaved

With --baseline-tree each round runs the two trees in fresh child processes (one round each, the order
alternating between rounds), so a before/after comparison shares the machine's load; the table then shows both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import write_results

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"
TRANSFORMER = REPO / "configs" / "recipes" / "transformer.yaml"


def build(kind: str):
    import ebt
    from launch.config import load_config

    paths = [QUICKSTART] if kind == "ebt" else [QUICKSTART, TRANSFORMER]
    cfg = load_config(paths).model
    torch.manual_seed(0)
    return ebt.build_model(cfg).eval(), cfg


def tokens_per_second(model, prompt: torch.Tensor, new: int, steps: int | None, samples: int) -> float:
    from ebt.inference import generate

    kwargs = {} if steps is None else {"steps": steps, "samples": samples}
    start = time.perf_counter()
    out = generate(model, prompt, new, generator=torch.Generator().manual_seed(0), **kwargs)
    seconds = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) * prompt.shape[0] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-write", action="store_true", help="print the JSON only")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of an earlier commit (git archive REV | tar -x -C DIR): measure both trees, "
                             "rounds interleaved, and write the before/after table")
    args = parser.parse_args()
    if args.baseline_tree is not None:
        compare(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `ebt generate` does
    ebt_model, ebt_cfg = build("ebt")
    tpp_model, tpp_cfg = build("transformer")
    trained = ebt_cfg.thinking.eval_steps
    eos = ebt_cfg.architecture.vocab_size - 1
    prompt = torch.cat((torch.tensor([[eos]]),
                        torch.randint(0, ebt_cfg.architecture.vocab_size - 1, (1, args.prompt_tokens),
                                      generator=torch.Generator().manual_seed(0))), dim=1)
    settings = [("Transformer++", tpp_model, None, 1)]
    settings += [(f"EBT, {steps} step(s) x {samples} sample(s)", ebt_model, steps, samples)
                 for steps in sorted({1, trained}) for samples in (1, 4)]
    for _, model, steps, samples in settings:  # warm-up: first-call allocations and lazy initialisation
        tokens_per_second(model, prompt, 4, steps, samples)
    rates: dict[str, list[float]] = {name: [] for name, *_ in settings}
    for round_index in range(args.rounds):
        order = settings if round_index % 2 == 0 else settings[::-1]
        for name, model, steps, samples in order:
            rates[name].append(tokens_per_second(model, prompt, args.new_tokens, steps, samples))
    load = os.getloadavg()
    median = {name: statistics.median(values) for name, values in rates.items()}
    baseline = median["Transformer++"]
    rows = [{"setting": name, "steps": steps, "samples": samples, "tokens_per_s": median[name],
             "rounds": rates[name], "ratio_to_transformer": median[name] / baseline}
            for name, _, steps, samples in settings]
    greedy = median[f"EBT, {trained} step(s) x 1 sample(s)"] / baseline
    payload = {
        "size": ebt_cfg.size, "context": ebt_cfg.architecture.context_length, "vocab": ebt_cfg.architecture.vocab_size,
        "trained_steps": trained, "prompt_tokens": prompt.shape[1], "new_tokens": args.new_tokens,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "load_average": list(load),
        "cpu_count": os.cpu_count(), "ebt_greedy_trained_ratio": greedy, "rows": rows,
    }
    import json

    print(json.dumps(payload))
    if args.no_write:
        return
    lines = [
        f"## Generation (`python -m benchmarks.generate`): quickstart size ({ebt_cfg.size}, context "
        f"{ebt_cfg.architecture.context_length}, vocab {ebt_cfg.architecture.vocab_size}), random weights, greedy, "
        "batch 1, "
        f"{prompt.shape[1]}-token prompt, {args.new_tokens} new tokens, {torch.get_num_threads()} thread(s)",
        "",
        f"Median of {args.rounds} alternated rounds. Load average after the run: {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min, {os.cpu_count()} cores).",
        "",
        "| setting | tokens/s | EBT / Transformer++ |",
        "|---|---|---|",
        *(f"| {row['setting']} | {row['tokens_per_s']:.1f} | {row['ratio_to_transformer']:.2f}x |" for row in rows),
        "",
        f"EBT greedy at its trained {trained} steps: **{greedy:.2f}x** Transformer++'s tokens/s (issue 23's target: "
        ">= 0.5x). The 0.88x of 2026-12-01 compared `ebt generate` runs (text decoding and streaming included), "
        "not the models alone.",
    ]
    write_results("generate", payload, "\n".join(lines))


def compare(args: argparse.Namespace) -> None:
    """This tree against --baseline-tree: per round one child process per tree (order alternating), then the
    median of each setting's per-round rates."""
    import json

    from benchmarks.common import run_isolated

    child = ["benchmarks.generate", "--rounds", "1", "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
             str(args.new_tokens), "--no-write"] + (["--threads", str(args.threads)] if args.threads else [])
    trees = {"before": args.baseline_tree.resolve(), "after": None}
    rates: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    last: dict[str, dict] = {}
    load_start = os.getloadavg()
    for round_index in range(args.rounds):
        for label in (("before", "after") if round_index % 2 == 0 else ("after", "before")):
            result = run_isolated(child, tree=trees[label])
            last[label] = result
            for row in result["rows"]:
                rates[label].setdefault(row["setting"], []).extend(row["rounds"])
    load_end = os.getloadavg()
    median = {label: {name: statistics.median(values) for name, values in by.items()} for label, by in rates.items()}
    trained = last["after"]["trained_steps"]
    greedy = f"EBT, {trained} step(s) x 1 sample(s)"
    # Paired per round (the two trees ran back to back): robust to a round the machine's load slowed.
    paired = {name: statistics.median(a / b for a, b in zip(rates["after"][name], rates["before"][name],
                                                             strict=True)) for name in median["after"]}
    rows = [{"setting": name, "before_tokens_per_s": median["before"][name], "after_tokens_per_s": value,
             "speedup": paired[name], "before_best": max(rates["before"][name]),
             "after_best": max(rates["after"][name]),
             "after_ratio_to_transformer": value / median["after"]["Transformer++"],
             "before_rounds": rates["before"][name], "after_rounds": rates["after"][name]}
            for name, value in median["after"].items()]
    ratio = {label: median[label][greedy] / median[label]["Transformer++"] for label in median}
    info = last["after"]
    payload = {
        "size": info["size"], "context": info["context"], "vocab": info["vocab"], "trained_steps": trained,
        "prompt_tokens": info["prompt_tokens"], "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": info["threads"], "baseline_tree": str(args.baseline_tree), "load_average_start": list(load_start),
        "load_average_end": list(load_end), "cpu_count": os.cpu_count(),
        "ebt_greedy_trained_ratio": {"before": ratio["before"], "after": ratio["after"]}, "rows": rows,
    }
    print(json.dumps(payload))
    if args.no_write:
        return
    lines = [
        f"## Generation (`python -m benchmarks.generate --baseline-tree DIR`): quickstart size ({info['size']}, "
        f"context {info['context']}, vocab {info['vocab']}), random weights, greedy, batch 1, "
        f"{info['prompt_tokens']}-token prompt, {args.new_tokens} new tokens, {info['threads']} thread(s)",
        "",
        f"Before: {args.baseline_tree.name} (the tree before issue 23's one-loop change); after: this tree. Median "
        f"of {args.rounds} rounds, each round one child process per tree, order alternating. Load average at the "
        f"start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at the end {load_end[0]:.2f} / "
        f"{load_end[1]:.2f} / {load_end[2]:.2f} (1 / 5 / 15 min, {os.cpu_count()} cores).",
        "",
        "| setting | before tokens/s (best) | after tokens/s (best) | after / before, paired by round | "
        "after: EBT / Transformer++ |",
        "|---|---|---|---|---|",
        *(f"| {row['setting']} | {row['before_tokens_per_s']:.1f} ({row['before_best']:.1f}) | "
          f"{row['after_tokens_per_s']:.1f} ({row['after_best']:.1f}) | {row['speedup']:.2f}x | "
          f"{row['after_ratio_to_transformer']:.2f}x |" for row in rows),
        "",
        f"EBT greedy at its trained {trained} steps: **{ratio['after']:.2f}x** Transformer++'s tokens/s (before: "
        f"{ratio['before']:.2f}x; issue 23's target: >= 0.5x).",
    ]
    write_results("generate", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
