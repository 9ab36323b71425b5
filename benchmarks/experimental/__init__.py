"""Measured alternatives, not the default: what the benchmarks compare the library's choices against.

Nothing in the installed packages (the model, its training loop, inference) imports this package, so it lives
under benchmarks/, outside them: benchmarks and tests import it (tests/test_layers.py keeps it that way).

- `compiled`: the inner gradient as a torch.func function, compiled with torch.compile (falls back to eager),
  and the forward-over-reverse "mcmc_step" recompute (benchmarks/second_order.py --experimental).
- `attention_impls`: double-backward-capable candidate attention implementations (benchmarks/attention.py);
  the fastest correct one is the default in ebt/attention.py.
- `step_runners`: the straightforward torch.utils.checkpoint recipe for "mcmc_step" (the benchmark's comparison
  point for ebt.checkpointing.RematerialisedStep) and `use_step_runner`, which hands any of these to a model
  through ebt.checkpointing.apply_checkpointing, the only way a model takes a step runner.
"""
