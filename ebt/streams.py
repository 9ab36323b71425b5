"""A causal stack of blocks with a key/value cache: the real stream of the EBT and the whole Transformer++."""

from __future__ import annotations

import torch
from torch import nn

from ebt.attention import causal_attention
from ebt.layers import RotaryEmbedding

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


# adaLN modulation of one block: (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp), each [D].
Modulation = tuple[torch.Tensor, ...]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT): x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def causal_stack(
    blocks: nn.ModuleList,
    rope: RotaryEmbedding,
    hidden: torch.Tensor,
    past: KeyValues | None = None,
    need_output: bool = True,
    modulations: list[Modulation] | None = None,
) -> tuple[torch.Tensor | None, KeyValues]:
    """Run new positions `hidden` [B, n, D] after `past` cached positions; return the output and the full cache.

    With need_output=False the last block stops after computing its keys and values, which is all the EBT's
    candidates read from the real stream. `modulations` (one per block) applies gated adaLN.
    """
    past_length = 0 if past is None else past[0][0].shape[-2]
    positions = torch.arange(past_length, past_length + hidden.shape[1], device=hidden.device)
    cache: KeyValues = []
    for layer, block in enumerate(blocks):
        mod = None if modulations is None else modulations[layer]
        normed = block.attn_norm(hidden)
        if mod is not None:
            normed = modulate(normed, mod[0], mod[1])
        q, k, v = block.qkv(normed)
        k = rope(k, positions)
        if past is not None:
            k = torch.cat((past[layer][0], k), dim=-2)
            v = torch.cat((past[layer][1], v), dim=-2)
        cache.append((k, v))
        if not need_output and layer == len(blocks) - 1:
            return None, cache
        scores = causal_attention(rope(q, positions), k, v, past_length, block.attn_scale)
        attended = block.wo(block.merge_heads(scores))
        if mod is None:
            hidden = hidden + attended
            hidden = hidden + block.mlp(block.ffn_norm(hidden))
        else:
            hidden = hidden + mod[2] * attended
            hidden = hidden + mod[5] * block.mlp(modulate(block.ffn_norm(hidden), mod[3], mod[4]))
    return hidden, cache
