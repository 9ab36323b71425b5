"""Does thinking help? Transformer++ and EBTs trained alike, then perplexity by thinking steps and samples.

In one run: trains Transformer++ and each EBT configuration of CONFIGS with `ebt train` on the embedded corpus
(the stdlib's code, no prose), then evaluates every checkpoint with `ebt eval`'s code on its validation split
(in distribution) and on Debian python3-doc's reST prose (out of distribution; `apt install python3-doc`).
Transformer++ also trains for the EBT's training FLOPs (ebt.flops), for the comparison at equal compute.

    python -m benchmarks.thinking                      # all configurations; ~35 min on 2 cores
    python -m benchmarks.thinking --configs ebt_s1 --max-steps 100 --quick

Writes benchmarks/results/thinking.json and the "thinking" table of benchmarks/README.md. The JSON:
{"best": NAME, "configs": {NAME: {"kind", "trained_steps", "ppl": {SOURCE: {"1": p1, "2": p2, ...}},
 "ppl_samples4": {...}, "energy_per_step": {...}, "ce_curves": {...}, ...}}, "sources": {SOURCE: "in_distribution"
 | "out_of_distribution"}}.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, write_results

REPO = BENCH_DIR.parent
OOD_GLOB = "/usr/share/doc/python3-doc/html/_sources/**/*.txt"
QUICKSTART = REPO / "configs" / "train" / "quickstart.yaml"
RECIPES = REPO / "configs" / "recipes"

# Every configuration trains on the quickstart's data, context, batch and schedule; the files come after the
# quickstart's, so their keys win. The quickstart's own thinking loop is configs/recipes/ebt_think.yaml, the
# configuration this benchmark found to think best ("ebt_think").
LOGITS_AS_BEFORE = [  # the quickstart before issue 12: ebt_logits.yaml, K=2, uniform starts (untied projection)
    "model.thinking.mcmc_steps=2", "model.thinking.landscape_repeats=0", "model.thinking.landscape_repeats_min=0",
    "model.thinking.truncate=false",
    "model.thinking.alpha_init=500.0", "model.thinking.alpha_lr_mult=1500.0", "model.thinking.alpha_random_scale=1.0",
    "model.thinking.init_logit_std=0.0", "model.thinking.langevin_noise_std=0.0", "model.replay.capacity=0",
    "model.replay.fraction=0.0", "optim.betas=[0.9,0.95]", "optim.decay_norms_and_biases=false",
]
CONFIGS: dict[str, dict] = {
    "transformer": {"files": [RECIPES / "transformer.yaml"], "overrides": []},
    "ebt_logits": {"files": [RECIPES / "ebt_logits.yaml"], "overrides": LOGITS_AS_BEFORE},
    "ebt_s1": {"files": [RECIPES / "ebt_s1.yaml"], "overrides": []},
    "ebt_s2": {"files": [RECIPES / "ebt_s2.yaml"], "overrides": []},
    "ebt_think": {"files": [], "overrides": []},
}
STEP_GRID = (1, 2, 4, 8)


def train(name: str, spec: dict, args: argparse.Namespace, runs: Path, max_steps: int, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "launch.cli", "train", str(QUICKSTART), *map(str, spec["files"]),
           *spec["overrides"], f"trainer.max_steps={max_steps}", f"runs_dir={runs}", f"name={name}",
           "logging.wandb=false", "logging.progress=false", "checkpoint.every=0", "trainer.eval_every=0",
           f"trainer.eval_batches={args.eval_batches}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = runs / f"{name}.log"
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"training {name} failed (exit {done.returncode}); see {log}")
    return runs / name


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ce_curves(run: Path) -> dict[str, list]:
    """ce_step_k per logged step, plus the summary the targets read: ce_step_{K-1} below ce_step_0 over the
    second half of training."""
    train_rows = [r for r in rows(run) if "loss" in r and not r.get("skipped")]
    keys = sorted({k for r in train_rows for k in r if k.startswith("ce_step_")}, key=lambda k: int(k[8:]))
    curves = {"step": [r["step"] for r in train_rows], **{k: [r.get(k) for r in train_rows] for k in keys}}
    curves["ce_final"] = [math.log(r["ppl"]) if r.get("ppl") else None for r in train_rows]  # the last step run
    return curves


def second_half_margin(curves: dict, last_key: str) -> dict:
    steps = curves["step"]
    half = steps[-1] / 2 if steps else 0
    pairs = [(a, b) for s, a, b in zip(steps, curves.get("ce_step_0", []), curves.get(last_key, []), strict=False)
             if s > half and a is not None and b is not None]
    below = [b < a for a, b in pairs]
    return {"rows": len(pairs), "rows_below": sum(below), "always_below": bool(pairs) and all(below),
            "mean_gain_nats": sum(a - b for a, b in pairs) / len(pairs) if pairs else None}


def evaluate(run: Path, kind: str, args: argparse.Namespace, steps: list[int], samples: list[int],
             noise: float) -> dict:
    from eval.evaluate import EvalSettings, run_eval

    settings = EvalSettings(steps=steps, samples=samples, selections=["min"], accept_lower=[False], noise=noise,
                            batch_size=8, max_batches=args.eval_max_batches, seed=0)
    ood = [OOD_GLOB] if args.ood else []
    return run_eval(run, None, ood, settings, out_path=run / f"eval-{'x'.join(map(str, samples))}-{noise}.json",
                    progress=False, print_table=False)


def source_key(source: dict) -> str:
    return "python3_doc_prose" if source["ood"] else "val"


def summarise_ebt(report_one: dict, report_many: dict, trained: int) -> dict:
    out: dict = {"ppl": {}, "ppl_samples4": {}, "energy_per_step": {}}
    for src in report_one["sources"]:
        key = source_key(src)
        cells = {g["steps"]: g for g in src["grid"] if g["samples"] == 1 and not g["accept_lower"]}
        out["ppl"][key] = {str(s): cells[s]["ppl"] for s in sorted(cells)}
        longest = cells[max(cells)]
        out["energy_per_step"][key] = longest["mean_energy_per_step"]
    for src in report_many["sources"]:
        key = source_key(src)
        cells = {g["steps"]: g for g in src["grid"] if g["samples"] > 1}
        out["ppl_samples4"][key] = {str(s): cells[s]["ppl"] for s in sorted(cells)}
    gains = {}
    for key, ppl in out["ppl"].items():
        base, double = ppl.get(str(trained)), ppl.get(str(2 * trained))
        gains[key] = None if base is None or double is None else 100.0 * (base - double) / base
    out["system2_gain_pct"] = gains  # trained steps -> twice as many, one sample
    gains4 = {}
    for key, ppl in out["ppl_samples4"].items():
        base = out["ppl"][key].get(str(trained))
        four = ppl.get(str(trained))
        gains4[key] = None if base is None or four is None else 100.0 * (base - four) / base
    out["samples4_gain_pct"] = gains4  # trained steps, 4 noisy samples with min-energy selection vs 1
    return out


def trajectory_diagnostic(run: Path, steps: int = 8, windows: int = 16) -> list[dict]:
    """Why energy and perplexity can part: along one noise-free chain on validation windows, per step, the
    energy, the CE of the state, |dE/dy|, the step's move |dy| and cos(dE/dy, dCE/dy). A step changes E by about
    -alpha |dE/dy|^2 but the CE by about -alpha |dE/dy| |dCE/dy| cos, so near a stationary point of E the
    energy stalls while the CE still moves, in the direction the cosine's sign says."""
    import torch

    from eval.evaluate import EvalSettings, _open, resolve_sources
    from launch.checkpoint import load_model, resolve_checkpoint

    torch.set_flush_denormal(True)
    path = resolve_checkpoint(run)
    model, cfg = load_model(path)
    model.eval()
    spec = resolve_sources(path, None, [], EvalSettings(), model_vocab=cfg.architecture.vocab_size)[0]
    batch = next(iter(_open(spec, cfg.architecture.context_length, windows)))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    energy_fn = model.energy_fn(inputs)
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(*inputs.shape, cfg.architecture.vocab_size, generator=generator) * cfg.thinking.init_logit_std
    alpha, bound = model.alpha.detach(), model.grad_bound()
    from ebt.mcmc import candidate, inner_gradient

    out = []
    for n in range(steps):
        rule, landscape = model.thinking_loop.rule(n), min(n, cfg.thinking.mcmc_steps - 1)
        y = state.detach().requires_grad_(True)
        energy = energy_fn(candidate(y, rule), landscape)
        ce = torch.nn.functional.cross_entropy(y.flatten(0, 1), targets.flatten())
        (d_energy,) = torch.autograd.grad(energy.sum(), y, retain_graph=True)
        (d_ce,) = torch.autograd.grad(ce, y)
        base, grad, _ = inner_gradient(energy_fn, y.detach(), landscape, rule,
                                       bound.detach() if torch.is_tensor(bound) else bound, create_graph=False)
        new = (base.detach() - alpha * grad).detach()
        cos = torch.nn.functional.cosine_similarity(d_energy.reshape(-1, cfg.architecture.vocab_size),
                                                    d_ce.reshape(-1, cfg.architecture.vocab_size), dim=1).mean()
        out.append({"step": n, "energy": float(energy.mean()), "ce_of_state": float(ce),
                    "grad_norm": float(d_energy.norm(dim=-1).mean()), "move": float((new - y).norm(dim=-1).mean()),
                    "cos_energy_ce": float(cos)})
        state = new
    return out


def diagnose(args: argparse.Namespace) -> None:
    """Add trajectory diagnostics of the runs in --work to results/thinking.json and re-render the table."""
    from benchmarks.common import RESULTS_DIR
    from ebt.flops import train_flops_per_token
    from launch.checkpoint import load_model, resolve_checkpoint

    path = RESULTS_DIR / "thinking.json"
    payload = json.loads(path.read_text())
    transformer = payload["configs"].get("transformer")
    for name, c in payload["configs"].items():
        # FLOPs from the current FLOP model (random step schemes are charged the steps they run on average).
        c["flops_per_token"] = train_flops_per_token(load_model(resolve_checkpoint(Path(args.work) / name))[1])
        if c["kind"] == "ebt":
            c["trajectory"] = trajectory_diagnostic(Path(args.work) / name)
            if transformer is not None and "equal_flops_run" in transformer:
                c["flops_ratio"] = c["flops_per_token"] / transformer["flops_per_token"]
                longest = transformer["equal_flops_run"]["flops_ratio_trained_for"]
                c["vs_transformer_equal_flops_note"] = (
                    f"Transformer++ trained for {longest:.2f}x the tokens; this EBT's own FLOPs are "
                    f"{c['flops_ratio']:.2f}x Transformer++'s per token, so the equal-FLOPs ratio is conservative "
                    "for it" if c["flops_ratio"] <= longest else "Transformer++ trained for fewer FLOPs than it")
    write_results("thinking", payload, render(payload))
    print(render(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per run (16 x 64 tokens)")
    parser.add_argument("--eval-batches", type=int, default=8, help="trainer validation batches")
    parser.add_argument("--eval-max-batches", type=int, default=12, help="eval batches of 8 windows per source")
    parser.add_argument("--noise", type=float, default=0.5, help="Langevin noise of the 4-sample cells")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/ebt-thinking", help="runs go here")
    parser.add_argument("--quick", action="store_true", help="do not write results (exploration)")
    parser.add_argument("--no-ood", dest="ood", action="store_false")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=CONFIG.yaml",
                        help="another EBT configuration to train and evaluate (repeatable)")
    parser.add_argument("--diagnose", action="store_true",
                        help="only add trajectory diagnostics of the runs in --work to results/thinking.json")
    args = parser.parse_args()
    if args.diagnose:
        diagnose(args)
        return
    for extra in args.extra:
        name, _, path = extra.partition("=")
        if not name or not Path(path).is_file():
            parser.error(f"--extra: expected NAME=existing.yaml, got {extra!r}")
        CONFIGS[name] = {"files": [Path(path).resolve()], "overrides": []}
    if args.ood and not glob.glob(OOD_GLOB, recursive=True):
        parser.error(f"no out-of-distribution prose at {OOD_GLOB}: apt install python3-doc, or pass --no-ood")
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; expected names from {', '.join(CONFIGS)}")
    runs = Path(args.work)
    runs.mkdir(parents=True, exist_ok=True)
    started = time.time()
    configs: dict[str, dict] = {}
    from ebt.flops import train_flops_per_token
    from launch.checkpoint import load_model, resolve_checkpoint

    for name in names:
        spec = CONFIGS[name]
        t0 = time.time()
        run = train(name, spec, args, runs, args.max_steps, [])
        _, cfg = load_model(resolve_checkpoint(run))
        final = [r for r in rows(run) if r.get("final")][-1]
        entry: dict = {"kind": cfg.kind, "train_s": time.time() - t0, "tokens": final.get("tokens"),
                       "val_loss_trainer": final["val_loss"], "flops_per_token": train_flops_per_token(cfg),
                       "params": None}
        if cfg.kind == "ebt":
            trained = cfg.thinking.eval_steps
            steps = sorted({*STEP_GRID, trained, 2 * trained})
            one = evaluate(run, cfg.kind, args, steps, [1], 0.0)
            many = evaluate(run, cfg.kind, args, [trained], [4], args.noise)
            curves = ce_curves(run)
            # ce_step_{K-1}; with random step counts, the CE of whichever step ran last
            think = cfg.thinking
            last_key = ("ce_final" if think.landscape_repeats or think.random_steps_min
                        else f"ce_step_{think.mcmc_steps - 1}")
            entry.update(trained_steps=trained, params=one["n_params"], **summarise_ebt(one, many, trained),
                         ce_curves=curves, ce_last_vs_first=second_half_margin(curves, last_key),
                         ce_last_key=last_key)
        else:
            report = evaluate(run, cfg.kind, args, [1], [1], 0.0)
            entry.update(trained_steps=None, params=report["n_params"],
                         ppl={source_key(s): {"plain": s["plain"]["ppl"]} for s in report["sources"]})
        configs[name] = entry
        print(f"{name}: {time.time() - t0:.0f} s, ppl {entry['ppl']}", flush=True)

    transformer = configs.get("transformer")
    ebts = [n for n, c in configs.items() if c["kind"] == "ebt"]
    if transformer is not None and ebts:
        # Equal training FLOPs: Transformer++ trained for the most expensive EBT's FLOPs (so every EBT has a
        # Transformer++ point at or beyond its compute; ratios are read at each EBT's own FLOPs).
        ratios = {n: configs[n]["flops_per_token"] / transformer["flops_per_token"] for n in ebts}
        longest = max(ratios.values())
        run = train("transformer_equal_flops", CONFIGS["transformer"], args, runs,
                    int(round(args.max_steps * longest)), [])
        report = evaluate(run, "transformer", args, [1], [1], 0.0)
        equal_flops = {source_key(s): s["plain"]["ppl"] for s in report["sources"]}
        transformer["equal_flops_run"] = {"max_steps": int(round(args.max_steps * longest)), "ppl": equal_flops,
                                          "flops_ratio_trained_for": longest}
        for n in ebts:
            c = configs[n]
            best_cell = {k: c["ppl"][k][str(c["trained_steps"])] for k in c["ppl"]}
            c["vs_transformer_equal_tokens"] = {k: best_cell[k] / transformer["ppl"][k]["plain"] for k in best_cell}
            c["vs_transformer_equal_flops"] = {k: best_cell[k] / equal_flops[k] for k in best_cell if k in equal_flops}
            c["flops_ratio"] = ratios[n]
            c["vs_transformer_equal_flops_note"] = (
                f"Transformer++ trained for {longest:.2f}x the tokens (the costliest EBT's FLOPs); this EBT's own "
                f"FLOPs are {ratios[n]:.2f}x, so the equal-FLOPs ratio is conservative for it")
    best = pick_best(configs)
    load = os.getloadavg()
    payload = {"best": best, "configs": configs,
               "sources": {"val": "in_distribution", "python3_doc_prose": "out_of_distribution"},
               "settings": {"max_steps": args.max_steps, "base": str(QUICKSTART.relative_to(REPO)),
                            "eval_windows_per_source": 8 * args.eval_max_batches, "noise_samples4": args.noise,
                            "threads": args.threads},
               "wall_s": time.time() - started, "load_average": load}
    table = render(payload)
    print(table)
    if not args.quick:
        path = write_results("thinking", payload, table)
        print(f"wrote {path}")


def pick_best(configs: dict) -> str | None:
    """The EBT configuration that meets the most targets, then the lowest perplexity at 4 steps in distribution."""
    def score(c: dict) -> tuple:
        met = sum(targets(c).values())
        return (met, -c["ppl"]["val"].get("4", float("inf")))

    ebts = {n: c for n, c in configs.items() if c["kind"] == "ebt"}
    return max(ebts, key=lambda n: score(ebts[n])) if ebts else None


def targets(c: dict) -> dict[str, bool]:
    """Issue 12's targets for one EBT configuration."""
    out = {}
    for key, ppl in c["ppl"].items():
        out[f"falls_1_2_4_{key}"] = ppl["1"] > ppl["2"] > ppl["4"]
    gains = c.get("system2_gain_pct", {})
    if gains.get("val") is not None and gains.get("python3_doc_prose") is not None:
        out["ood_gain_at_least_id_gain"] = gains["python3_doc_prose"] >= gains["val"]
    out["ce_last_below_first_second_half"] = bool(c.get("ce_last_vs_first", {}).get("always_below"))
    return out


def _fmt(value, ratio: bool = False) -> str:
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2f}" if ratio else f"{value:.4g}"


def render(payload: dict) -> str:
    configs = payload["configs"]
    s = payload["settings"]
    lines = [
        f"## Thinking (`python -m benchmarks.thinking`): {s['base']} data and model (4xs, context 64, vocab "
        f"2048), {s['max_steps']} steps of 16 x 64 tokens, {s['eval_windows_per_source']} windows per source",
        "",
        f"Wall time {payload['wall_s'] / 60:.0f} min; load average after the run "
        f"{payload['load_average'][0]:.2f} / {payload['load_average'][1]:.2f} / {payload['load_average'][2]:.2f}. "
        "val = the embedded corpus's validation split (in distribution); prose = python3-doc reST (out of "
        "distribution). Best configuration: **" + str(payload["best"]) + "**.",
        "",
        "| config | source | ppl @1 | @2 | @4 | @8 | trained steps | ppl @trained | @2x trained | System-2 gain % "
        "(trained -> 2x) | 4 samples gain % | vs T++ equal tokens | vs T++ equal FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        for key, ppl in c["ppl"].items():
            if c["kind"] != "ebt":
                lines.append(f"| {name} | {key} | {_fmt(ppl['plain'])} | | | | | | | | | 1 | |")
                continue
            t = c["trained_steps"]
            lines.append(
                f"| {name} | {key} | {_fmt(ppl.get('1'))} | {_fmt(ppl.get('2'))} | {_fmt(ppl.get('4'))} | "
                f"{_fmt(ppl.get('8'))} | {t} | {_fmt(ppl.get(str(t)))} | {_fmt(ppl.get(str(2 * t)))} | "
                f"{_fmt(c['system2_gain_pct'].get(key), True)} | {_fmt(c['samples4_gain_pct'].get(key), True)} | "
                f"{_fmt(c.get('vs_transformer_equal_tokens', {}).get(key), True)}x | "
                f"{_fmt(c.get('vs_transformer_equal_flops', {}).get(key), True)}x |")
    lines += ["", "Targets per EBT configuration (issue 12):", "",
              "| config | ppl falls 1 > 2 > 4 (val) | (prose) | OOD gain >= ID gain | ce_step_last < ce_step_0 in "
              "the second half | energy per step (val) |", "|---|---|---|---|---|---|"]
    for name, c in configs.items():
        if c["kind"] != "ebt":
            continue
        t = targets(c)
        margin = c["ce_last_vs_first"]
        energy = " -> ".join(f"{e:.3f}" for e in c["energy_per_step"].get("val", []))
        lines.append(f"| {name} | {t.get('falls_1_2_4_val')} | {t.get('falls_1_2_4_python3_doc_prose')} | "
                     f"{t.get('ood_gain_at_least_id_gain')} | {margin['always_below']} ({margin['rows_below']}/"
                     f"{margin['rows']} rows, {c['ce_last_key']}) | {energy} |")
    diagnosed = [(n, c) for n, c in configs.items() if c.get("trajectory")]
    if diagnosed:
        lines += ["", "Along one noise-free chain (16 validation windows): |dE/dy| and the move |dy| per step, and "
                  "cos(dE/dy, dCE/dy) (positive: descending the energy lowers the CE):", "",
                  "| config | step | E | CE of the state | abs dE/dy | move | cos |", "|---|---|---|---|---|---|---|"]
        for name, c in diagnosed:
            for d in c["trajectory"]:
                lines.append(f"| {name} | {d['step']} | {d['energy']:.4f} | {d['ce_of_state']:.3f} | "
                             f"{d['grad_norm']:.2e} | {d['move']:.3g} | {d['cos_energy_ce']:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
