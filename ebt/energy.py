"""The energy function E(context, candidate): a Llama-style transformer over real tokens and candidates.

Contract (checked against a naive causal-LM oracle in tests/test_oracle.py): E_i equals the last-position
energy of a plain causal transformer run on [x_0..x_i, p_i] with p_i at RoPE position i+1. Variants:

- default: exactly that.
- time_embed: a learned token per MCMC step is prepended to the real stream at position 0 (as in the paper),
  so the oracle sequence is [t_k, x_0..x_i, p_i]. The real stream then depends on the step and cannot be cached.
- adaln: step-conditioned adaLN (shift and scale of each block's two norms), applied to the CANDIDATE stream
  only. Real tokens are context and carry no notion of a thinking step, so the real stream stays step-free and
  is computed once per forward. This is the step-conditioned variant that caches; time_embed is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ebt.attention import candidate_attention, visibility_bias
from ebt.config import ModelConfig
from ebt.layers import Block, RMSNorm, RotaryEmbedding, init_weights
from ebt.streams import causal_stack


@dataclass
class RealContext:
    """Per-layer rotated keys and values of the real stream, plus how many prefix tokens precede x_0."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    offset: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[-2]


class EnergyTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cand_proj = None
        if not cfg.tie_candidate_embedding:
            self.cand_proj = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # No bias: a bias only shifts E, never receives a gradient, and then breaks DDP (FACTS.md).
        self.energy_head = nn.Linear(cfg.dim, 1, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.context_length + 2, cfg.rope_theta)
        self.step_tokens = None
        self.step_emb = None
        self.adaln = None
        if cfg.variant == "time_embed":
            self.step_tokens = nn.Parameter(torch.empty(cfg.max_step_embeddings, cfg.dim))
        elif cfg.variant == "adaln":
            self.step_emb = nn.Embedding(cfg.max_step_embeddings, cfg.dim)
            self.adaln = nn.ModuleList(nn.Linear(cfg.dim, 4 * cfg.dim, bias=False) for _ in range(cfg.n_layers))
        # Set by ebt.checkpointing from cfg.checkpointing ("block" policies); a runtime switch, not a weight.
        self.checkpoint_blocks = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)
        for param in (self.cand_proj, self.step_tokens):
            if param is not None:
                nn.init.normal_(param, mean=0.0, std=self.cfg.init_std)
        if self.adaln is not None:
            # adaLN-Zero: every modulation starts as the identity, so adaln begins as the default variant.
            for linear in self.adaln:
                nn.init.zeros_(linear.weight)

    def step_index(self, step: int) -> int:
        # Steps past the table (System-2 inference with more steps than training) reuse its last entry.
        return min(step, self.cfg.max_step_embeddings - 1)

    # ---- real stream ---------------------------------------------------------------------------------------
    def context(self, tokens: torch.Tensor, step: int = 0) -> RealContext:
        """Keys and values of every layer for the real tokens (and the step token in time_embed)."""
        hidden = self.tok_emb(tokens)
        offset = 0
        if self.step_tokens is not None:
            step_token = self.step_tokens[self.step_index(step)]
            hidden = torch.cat((step_token.expand(hidden.shape[0], 1, -1), hidden), dim=1)
            offset = 1
        _, cache = causal_stack(self.blocks, self.rope, hidden, need_output=False)
        return RealContext([k for k, _ in cache], [v for _, v in cache], offset)

    def extend_context(self, context: RealContext, new_tokens: torch.Tensor) -> RealContext:
        """The context after appending `new_tokens` [B, n], computing only the new positions (generation)."""
        past = list(zip(context.keys, context.values, strict=True))
        _, cache = causal_stack(self.blocks, self.rope, self.tok_emb(new_tokens), past, need_output=False)
        return RealContext([k for k, _ in cache], [v for _, v in cache], context.offset)

    # ---- candidate stream ----------------------------------------------------------------------------------
    def candidate_embeddings(self, candidate_probs: torch.Tensor) -> torch.Tensor:
        weight = self.tok_emb.weight if self.cand_proj is None else self.cand_proj
        return candidate_probs @ weight

    def candidate_energies(
        self,
        context: RealContext,
        candidate_probs: torch.Tensor,
        step: int = 0,
        candidate_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Energies [B, Sc] of candidates [B, Sc, V]; candidate c predicts the token after x_{candidate_index[c]}."""
        hidden = self.candidate_embeddings(candidate_probs)
        if candidate_index is None:
            candidate_index = torch.arange(hidden.shape[1], device=hidden.device)
        last_visible = candidate_index + context.offset
        positions = last_visible + 1
        bias = visibility_bias(last_visible, context.length, hidden.dtype)
        step_vector = self.step_emb.weight[self.step_index(step)] if self.adaln is not None else None
        for layer in range(len(self.blocks)):
            args = (layer, hidden, positions, context.keys[layer], context.values[layer], bias, step_vector)
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # ebt.checkpointing's "block" policy: non-reentrant, the only kind that survives autograd.grad.
                hidden = checkpoint(self.candidate_layer, *args, use_reentrant=False)
            else:
                hidden = self.candidate_layer(*args)
        return self.energy_head(self.final_norm(hidden)).squeeze(-1)

    def candidate_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
        step_vector: torch.Tensor | None,
    ) -> torch.Tensor:
        """One block of the candidate stream over the real stream's `keys`/`values` of that layer."""
        block = self.blocks[layer]
        modulation = None if step_vector is None else self.adaln[layer](step_vector).chunk(4)
        normed = block.attn_norm(hidden)
        if modulation is not None:
            normed = normed * (1 + modulation[1]) + modulation[0]
        q, k, v = block.qkv(normed)
        q, k = self.rope(q, positions), self.rope(k, positions)
        attended = candidate_attention(q, k, v, keys, values, bias)
        hidden = hidden + block.wo(block.merge_heads(attended))
        normed = block.ffn_norm(hidden)
        if modulation is not None:
            normed = normed * (1 + modulation[3]) + modulation[2]
        return hidden + block.mlp(normed)
