"""Evaluation and scaling reports.

scaling     power-law fits L = E + A X^-alpha (Huber, multi-start L-BFGS, residual bootstrap), log-log slopes,
            EBT vs. Transformer++ rate comparisons
isoflop     compute-optimal size per FLOP budget and its exponent
sweep_data  collected sweep CSV/parquet and run dirs -> records; exclusion of unusable runs
plots       report figures (PNG bytes)
report      `ebt report`: report.md, report.html (self-contained), PNGs, fits.json
perplexity  exact per-token NLL accumulation
evaluate    `ebt eval`: perplexity, the EBT System-2 thinking grid, OOD sources
cli         registers `ebt eval` and `ebt report`
"""
