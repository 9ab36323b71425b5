"""fp32 parity between 2 ranks and 1 process, judged against the exact answer (tests/launch/test_train_parity.py,
tests/launch/test_second_order_ddp.py).

fp32: not a constant. The 2-rank and the 1-process runs compute the same function in fp32 with sums in other
orders (batch halves, the all-reduce), so neither is "right": both are judged against the exact answer, an fp64
replica of the 1-process reference from the same fp32 weights and inputs (widened exactly), stepped alongside.
The standard rounding-error bound of a computation (|error| <= gamma_n * sum|terms|) does not depend on the
order of its sums, and the 2 ranks add one rounding per gradient entry in the all-reduce (a sum of two and a
halving, exact), so the 2-rank run may be no less accurate than the 1-process run: every tensor's 2-rank error
must be within FP32_ERROR_FACTOR of the 1-process run's largest error over all tensors, each error relative to
its scale (gradients: max(1, the largest entry); weights: the three steps' largest possible update 3 x lr).
The 1-process error is measured in the same run, on the same machine and thread count, so the bound follows the
machine's BLAS and threading instead of being fitted to one of them. FP32_ERROR_FACTOR allows for the spread of
the largest of many rounding errors between two summation orders: the worst tensor of the 2-rank run against the
worst of ~20 tensors of the 1-process run; a wrong gradient or update (a missed shard, a skipped reshard, a wrong
norm) is off by O(1) of its scale, 1e4 or more above the fp32 errors. FP32_U (2**-24, fp32's unit roundoff) is
the least error either run can be held to.

Measured on the 2-core dev machine (2026-12-07), the worst 2-rank/1-process ratio over every case: fsdp gradients
1.00 and weights after 3 AdamW steps 1.11 at 1 thread per rank (1.00 and 1.15 at 2 threads); DDP with mcmc_step
checkpointing 1.12 (1.11). The old fixed bounds (1e-5 of the gradient scale, 2% of 3 x lr) held on one machine
and not on another (issue 20: 2.6e-5 and 1.16e-4 measured against them). The tests print the ratios (pytest -rP);
EBT_TEST_RANK_THREADS=2 reruns them at 2 threads per rank.
"""

from __future__ import annotations

import os

FP32_ERROR_FACTOR = 4.0
FP32_U = 2.0**-24


def fp32_ratio_check(errors: dict[str, list[float]], scales: dict[str, float], what: str, name: str) -> float:
    """errors[key] = [1-process error, 2-rank error] against the fp64 replica, scales[key] their yardstick.
    Asserts every 2-rank error is within FP32_ERROR_FACTOR of the 1-process run's worst; returns the worst ratio."""
    one_process = max(max(err[0] / scales[key], FP32_U) for key, err in errors.items())
    worst = 0.0
    for key, (_, two_rank) in errors.items():
        ratio = two_rank / scales[key] / one_process
        worst = max(worst, ratio)
        assert ratio <= FP32_ERROR_FACTOR, (
            f"{name} {key}: {what} error of 2 ranks {two_rank:.3g} is {ratio:.3g}x the 1-process run's worst "
            f"({one_process:.3g} of the scale {scales[key]:.3g}), both against fp64")
    return worst


def rank_threads() -> str:
    """Threads per rank: 1 in CI (2 ranks on 2 cores); EBT_TEST_RANK_THREADS=2 runs the same checks at 2 threads
    per rank, another reduction order inside the BLAS (the fp32 tolerances must hold at both)."""
    return os.environ.get("EBT_TEST_RANK_THREADS", "1")
