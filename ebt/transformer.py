"""Transformer++ baseline: a Llama-style causal LM built from the same blocks as the EBT, with an untied head."""

from __future__ import annotations

import torch
from torch import nn

from ebt.config import ModelConfig
from ebt.layers import Block, RMSNorm, RotaryEmbedding, init_weights
from ebt.losses import token_cross_entropy
from ebt.parametrization import readout_mult, widths
from ebt.streams import KeyValues, causal_stack
from ebt.validation import check_tokens


class TransformerPlusPlus(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.architecture.vocab_size, cfg.architecture.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.architecture.n_layers))
        self.final_norm = RMSNorm(cfg.architecture.dim, cfg.architecture.norm_eps)
        self.head = nn.Linear(cfg.architecture.dim, cfg.architecture.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.architecture.head_dim, cfg.architecture.context_length + 1,
                                    cfg.architecture.rope_theta)
        # The logits' multiplier: 1 under SP, μP's output_mult / m otherwise (ebt/parametrization.py).
        self.readout_mult = readout_mult(widths(cfg))
        init_weights(self, cfg)

    def logits(self, tokens: torch.Tensor, past: KeyValues | None = None) -> tuple[torch.Tensor, KeyValues]:
        hidden, cache = causal_stack(self.blocks, self.rope, self.tok_emb(tokens), past)
        logits = self.head(self.final_norm(hidden))
        return (logits if self.readout_mult == 1.0 else logits * self.readout_mult), cache

    def forward(self, tokens: torch.Tensor):
        return self.loss(tokens)

    def loss(self, tokens: torch.Tensor):
        check_tokens("tokens", tokens, self.cfg.architecture.vocab_size, self.cfg.architecture.context_length + 1)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens: need at least 2 positions (inputs + targets), got {tokens.shape[1]}")
        logits, _ = self.logits(tokens[:, :-1])
        loss = token_cross_entropy(logits, tokens[:, 1:], self.cfg.loss.ignore_index)
        ce = loss.detach()  # metrics stay on the device (no host sync per step); reporters convert them
        return loss, {"loss": ce, "ce": ce, "ppl": ce.exp()}
