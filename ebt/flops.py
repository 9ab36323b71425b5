"""Parameter and FLOP counts per configuration, with a FLOP model that counts an EBT's real work.

Unit of account: a matmul of an [n, a] by [a, b] costs 2nab FLOPs. Per token, a linear layer's forward is one
unit (2 x its weights), its backward two units. For an EBT training step with K second-order MCMC steps:
- real stream: computed once when the variant caches it (forward 1 + backward 2 = 3 units), else once per step;
- each MCMC step over the candidate stream: forward 1, inner gradient dE/dlogits 1, outer backward through
  both 4 (the double backward differentiates the forward and the inner gradient): 6 units.
So default K=2 costs 3 + 2 x 6 = 15 units, about 5x Transformer++'s 3 (benchmarks/results/step.json
measures 5.4x for S1's uncached stream). The candidate projection
(probs @ W, V x D per token) and the Transformer++ head are counted like linear layers.
"""

from __future__ import annotations

from ebt.config import ModelConfig


def block_matmul_params(cfg: ModelConfig) -> int:
    """Weights touched by matmuls in one block: q, k, v, o and the three SwiGLU projections."""
    arch = cfg.architecture
    return 4 * arch.dim * arch.dim + 3 * arch.dim * arch.ffn_hidden


def parameter_count(cfg: ModelConfig) -> int:
    """Exact trainable parameter count of build_model(cfg) (checked in tests)."""
    arch = cfg.architecture
    per_block = block_matmul_params(cfg) + 2 * arch.dim  # plus two RMSNorm weights
    total = arch.n_layers * per_block + arch.vocab_size * arch.dim + arch.dim  # embedding, final norm
    if cfg.kind == "transformer":
        return total + arch.vocab_size * arch.dim  # untied head
    total += arch.dim + 1 + int(cfg.thinking.langevin_learnable)  # energy head, alpha, a learnable noise std
    if not arch.tie_candidate_embedding:
        total += arch.vocab_size * arch.dim
    if arch.variant == "time_embed":
        total += cfg.step_table_rows * arch.dim
    elif arch.variant == "adaln":  # step table, per block (D -> 6D) and final (D -> 2D) modulations with biases
        total += cfg.step_table_rows * arch.dim + arch.n_layers * 6 * arch.dim * (arch.dim + 1)
        total += 2 * arch.dim * (arch.dim + 1)
    return total


def forward_flops_per_token(cfg: ModelConfig, visible_keys: float) -> float:
    """One forward of the block stack for one position that attends to `visible_keys` keys on average."""
    arch = cfg.architecture
    linear = 2 * arch.n_layers * block_matmul_params(cfg)
    attention = 2 * 2 * arch.n_layers * arch.dim * visible_keys  # scores and weighted values
    return linear + attention


def expected_training_steps(cfg: ModelConfig) -> float:
    """Steps a training forward runs on average: repeated landscapes run U{max(min, 1)..R + 1} times each (the
    last only, with landscape_repeats_final_only), random_steps_min draws K ~ U{min..mcmc_steps}."""
    think = cfg.thinking
    if think.landscape_repeats:
        repeats = (max(think.landscape_repeats_min, 1) + think.landscape_repeats + 1) / 2
        repeated = 1 if think.landscape_repeats_final_only else think.mcmc_steps
        return think.mcmc_steps - repeated + repeated * repeats
    if think.random_steps_min is not None:
        return (think.random_steps_min + think.mcmc_steps) / 2
    return float(think.mcmc_steps)


def train_flops_per_token(cfg: ModelConfig, mcmc_steps: float | None = None) -> float:
    """FLOPs of one training step divided by the tokens it predicts (the average step, for random counts)."""
    arch = cfg.architecture
    seq = arch.context_length
    causal_keys = (seq + 1) / 2
    vocab_matmul = 2 * arch.vocab_size * arch.dim
    if cfg.kind == "transformer":
        return 3 * (forward_flops_per_token(cfg, causal_keys) + vocab_matmul)
    steps = expected_training_steps(cfg) if mcmc_steps is None else mcmc_steps
    real = forward_flops_per_token(cfg, causal_keys)
    candidate = forward_flops_per_token(cfg, causal_keys + 1) + vocab_matmul + 2 * arch.dim
    real_passes = 1 if cfg.caches_context else steps
    if cfg.thinking.truncate:
        # Earlier steps run forward + inner gradient only (2 units); the last step is second-order.
        return 3 * real_passes * real + 2 * (steps - 1) * candidate + 6 * candidate
    return 3 * real_passes * real + 6 * steps * candidate
