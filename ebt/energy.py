"""The energy function E(context, candidate): a Llama-style transformer over real tokens and candidates.

Contract (checked against a naive causal-LM oracle in tests/ebt/test_ebt_oracle.py): E_i equals the last-position
energy of a plain causal transformer run on [x_0..x_i, p_i] with p_i at RoPE position i+1. Variants:

- default: exactly that.
- time_embed: a learned token per MCMC step is prepended to the real stream at position 0 (as in the paper),
  so the oracle sequence is [t_k, x_0..x_i, p_i]. The real stream then depends on the step and cannot be cached.
- adaln: gated adaLN conditioned on the step (DiT's: SiLU(step embedding) -> shift, scale and gate of each
  block's attention and MLP branches, plus shift and scale before the energy head), as in the reference, where
  every position is modulated. With `adaln_real_stream=False` only the CANDIDATE stream is: real tokens are
  context and carry no notion of a thinking step, so the real stream stays step-free and is computed once per
  forward (this project's caching variant, same parameters).

Step tables have `mcmc_steps` rows (the trained landscapes); a step past them reuses the last trained row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ebt.attention import candidate_attention, visibility_bias
from ebt.config import ModelConfig
from ebt.layers import Block, RMSNorm, RotaryEmbedding, init_weights
from ebt.parametrization import readout_mult, widths
from ebt.streams import Modulation, causal_stack, modulate


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
        arch = cfg.architecture
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(arch.vocab_size, arch.dim)
        # The reference's vocab_to_embed: candidate distribution [V] -> embedding [D], untied by default.
        self.cand_proj = None if arch.tie_candidate_embedding else nn.Linear(arch.vocab_size, arch.dim, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(arch.n_layers))
        self.final_norm = RMSNorm(arch.dim, arch.norm_eps)
        # No bias: a bias only shifts E, never receives a gradient, and then breaks DDP (measured on 2 gloo
        # ranks: a silently wrong first step, then "Expected to have finished reduction";
        # tests/launch/test_train_parity.py guards it).
        self.energy_head = nn.Linear(arch.dim, 1, bias=False)
        # E's multiplier: 1 under SP, μP's output_mult / m otherwise (ebt/parametrization.py).
        self.readout_mult = readout_mult(widths(cfg))
        self.rope = RotaryEmbedding(arch.head_dim, arch.context_length + 2, arch.rope_theta)
        self.step_tokens = None
        self.step_emb = None
        self.adaln = None
        self.adaln_final = None
        rows = cfg.step_table_rows
        if arch.variant == "time_embed":
            self.step_tokens = nn.Parameter(torch.empty(rows, arch.dim))
        elif arch.variant == "adaln":
            self.step_emb = nn.Embedding(rows, arch.dim)
            self.adaln = nn.ModuleList(nn.Linear(arch.dim, 6 * arch.dim) for _ in range(arch.n_layers))
            self.adaln_final = nn.Linear(arch.dim, 2 * arch.dim)
        # Set by ebt.checkpointing from trainer.checkpointing ("block" policies); a runtime switch, not a weight.
        self.checkpoint_blocks = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cfg = self.cfg
        arch = cfg.architecture
        init_weights(self, cfg)
        if self.step_tokens is not None:  # the reference's time embeddings are an nn.Embedding
            nn.init.normal_(self.step_tokens, mean=0.0, std=1.0 if arch.init_scheme == "reference" else arch.init_std)
        if self.adaln is None:
            return
        if arch.init_scheme == "reference":  # the reference leaves its adaLN linears at PyTorch's default init
            w = widths(cfg)
            for linear in (*self.adaln, self.adaln_final):
                linear.reset_parameters()
                # Kaiming's U(+-1/sqrt(fan_in)) is already μP's for the matrix; the bias is a vector: base bound.
                if w.width_mult != 1.0:
                    with torch.no_grad():
                        linear.bias.mul_(math.sqrt(w.width_mult))
            return
        # Otherwise every modulation starts as the identity (shift 0, scale 0, gate 1): adaln begins as default.
        for linear in (*self.adaln, self.adaln_final):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in self.adaln:
            gates = linear.bias.view(6, arch.dim)
            nn.init.ones_(gates[2])
            nn.init.ones_(gates[5])

    def step_index(self, step: int) -> int:
        # Steps past the trained landscapes (System-2 inference) reuse the last trained one: rows beyond
        # mcmc_steps - 1 never receive a gradient.
        return min(step, self.cfg.thinking.mcmc_steps - 1)

    def modulations(self, step: int) -> list[Modulation] | None:
        """Per-block adaLN (shift, scale, gate) x (attention, MLP) for `step`; None without adaln."""
        if self.adaln is None:
            return None
        condition = F.silu(self.step_emb.weight[self.step_index(step)])
        return [linear(condition).chunk(6) for linear in self.adaln]

    def energy_readout(self, hidden: torch.Tensor, step: int) -> torch.Tensor:
        """E [B, Sc] from the candidate stream's last hidden states [B, Sc, D]."""
        normed = self.final_norm(hidden)
        if self.adaln_final is not None:
            shift, scale = self.adaln_final(F.silu(self.step_emb.weight[self.step_index(step)])).chunk(2)
            normed = modulate(normed, shift, scale)
        energy = self.energy_head(normed).squeeze(-1)
        return energy if self.readout_mult == 1.0 else energy * self.readout_mult

    # ---- real stream ---------------------------------------------------------------------------------------
    def context(self, tokens: torch.Tensor, step: int = 0) -> RealContext:
        """Keys and values of every layer for the real tokens (and the step token in time_embed)."""
        hidden = self.tok_emb(tokens)
        offset = 0
        if self.step_tokens is not None:
            step_token = self.step_tokens[self.step_index(step)]
            hidden = torch.cat((step_token.expand(hidden.shape[0], 1, -1), hidden), dim=1)
            offset = 1
        modulations = self.modulations(step) if self.cfg.architecture.adaln_real_stream else None
        _, cache = causal_stack(self.blocks, self.rope, hidden, need_output=False, modulations=modulations)
        return RealContext([k for k, _ in cache], [v for _, v in cache], offset)

    def extend_context(self, context: RealContext, new_tokens: torch.Tensor, step: int = 0) -> RealContext:
        """The context after appending `new_tokens` [B, n], computing only the new positions (generation)."""
        past = list(zip(context.keys, context.values, strict=True))
        modulations = self.modulations(step) if self.cfg.architecture.adaln_real_stream else None
        _, cache = causal_stack(self.blocks, self.rope, self.tok_emb(new_tokens), past, need_output=False,
                                modulations=modulations)
        return RealContext([k for k, _ in cache], [v for _, v in cache], context.offset)

    # ---- candidate stream ----------------------------------------------------------------------------------
    def candidate_embeddings(self, candidate_probs: torch.Tensor) -> torch.Tensor:
        if self.cand_proj is None:
            return candidate_probs @ self.tok_emb.weight
        return self.cand_proj(candidate_probs)

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
        modulations = self.modulations(step)
        for layer in range(len(self.blocks)):
            modulation = None if modulations is None else modulations[layer]
            args = (layer, hidden, positions, context.keys[layer], context.values[layer], bias, modulation)
            if self.checkpoint_blocks and torch.is_grad_enabled():
                # ebt.checkpointing's "block" policy: non-reentrant, the only kind that survives autograd.grad.
                hidden = checkpoint(self.candidate_layer, *args, use_reentrant=False)
            else:
                hidden = self.candidate_layer(*args)
        return self.energy_readout(hidden, step)

    def candidate_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
        modulation: Modulation | None,
    ) -> torch.Tensor:
        """One block of the candidate stream over the real stream's `keys`/`values` of that layer."""
        block = self.blocks[layer]
        normed = block.attn_norm(hidden)
        if modulation is not None:
            normed = modulate(normed, modulation[0], modulation[1])
        q, k, v = block.qkv(normed)
        q, k = self.rope(q, positions), self.rope(k, positions)
        attended = block.wo(block.merge_heads(candidate_attention(q, k, v, keys, values, bias, block.attn_scale)))
        if modulation is None:
            hidden = hidden + attended
            return hidden + block.mlp(block.ffn_norm(hidden))
        hidden = hidden + modulation[2] * attended
        return hidden + modulation[5] * block.mlp(modulate(block.ffn_norm(hidden), modulation[3], modulation[4]))
