"""An independent, naive reading of the EBT contract, used as the test oracle.

E_i is the last-position output of a plain causal transformer run on [x_0..x_i, p_i] (time_embed: on
[t_k, x_0..x_i, p_i]), with p_i embedded as p_i @ W and placed at the next RoPE position. Everything here is
written from the definitions (explicit masks, explicit rotary angles, one sequence at a time) and shares no code
with the model beyond reading its weights.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [H, T, d]: pair feature j with j + d/2 and rotate the pair at position t by t * theta^(-2j/d)."""
    heads, length, dim = x.shape
    half = dim // 2
    out = torch.empty_like(x)
    for t in range(length):
        for j in range(half):
            angle = torch.tensor(t * theta ** (-2.0 * j / dim), dtype=torch.float64)
            c, s = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
            a, b = x[:, t, j], x[:, t, j + half]
            out[:, t, j] = a * c - b * s
            out[:, t, j + half] = a * s + b * c
    return out


def modulated(normed: torch.Tensor, shift, scale, all_positions: bool) -> torch.Tensor:
    """adaLN x (1 + scale) + shift on every position, or on the candidate (last) position only."""
    if all_positions:
        return normed * (1 + scale) + shift
    return torch.cat((normed[:-1], normed[-1:] * (1 + scale) + shift))


def gated(update: torch.Tensor, gate, all_positions: bool) -> torch.Tensor:
    if all_positions:
        return gate * update
    return torch.cat((update[:-1], gate * update[-1:]))


def causal_lm_last_energy(model, sequence: torch.Tensor, step: int) -> torch.Tensor:
    """Energy of the last position of `sequence` [T, D] (already embedded) through the energy transformer."""
    energy_model = model.energy_model
    cfg = model.cfg
    length = sequence.shape[0]
    mask = torch.full((length, length), float("-inf"), dtype=sequence.dtype).triu(1)
    hidden = sequence
    step_row = min(step, cfg.thinking.mcmc_steps - 1)  # past the trained landscapes: the last trained one
    adaln = cfg.architecture.variant == "adaln"
    everywhere = cfg.architecture.adaln_real_stream
    condition = None
    if adaln:
        condition = torch.nn.functional.silu(energy_model.step_emb.weight[step_row])
    for layer, block in enumerate(energy_model.blocks):
        normed = rms_norm(hidden, block.attn_norm.weight, cfg.architecture.norm_eps)
        if adaln:
            linear = energy_model.adaln[layer]
            dim = cfg.architecture.dim
            shift1, scale1, gate1, shift2, scale2, gate2 = (linear.weight @ condition + linear.bias).split(dim)
            normed = modulated(normed, shift1, scale1, everywhere)
        heads = cfg.architecture.n_heads
        q = (normed @ block.wq.weight.T).view(length, heads, -1).transpose(0, 1)
        k = (normed @ block.wk.weight.T).view(length, heads, -1).transpose(0, 1)
        v = (normed @ block.wv.weight.T).view(length, heads, -1).transpose(0, 1)
        q, k = rotate(q, cfg.architecture.rope_theta), rotate(k, cfg.architecture.rope_theta)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(length, -1) @ block.wo.weight.T
        hidden = hidden + (gated(attended, gate1, everywhere) if adaln else attended)
        normed = rms_norm(hidden, block.ffn_norm.weight, cfg.architecture.norm_eps)
        if adaln:
            normed = modulated(normed, shift2, scale2, everywhere)
        gate = normed @ block.w1.weight.T
        mlp = ((gate * torch.sigmoid(gate)) * (normed @ block.w3.weight.T)) @ block.w2.weight.T
        hidden = hidden + (gated(mlp, gate2, everywhere) if adaln else mlp)
    last = rms_norm(hidden[-1], energy_model.final_norm.weight, cfg.architecture.norm_eps)
    if adaln:
        final = energy_model.adaln_final
        shift, scale = (final.weight @ condition + final.bias).split(cfg.architecture.dim)
        last = last * (1 + scale) + shift
    return last @ energy_model.energy_head.weight[0]


def oracle_energies(model, tokens: torch.Tensor, candidate_probs: torch.Tensor, step: int) -> torch.Tensor:
    """[B, S] energies, each from its own naive causal-LM run."""
    energy_model = model.energy_model
    cand_weight = energy_model.tok_emb.weight if energy_model.cand_proj is None else energy_model.cand_proj.weight.T
    batch, length = tokens.shape
    out = torch.empty(batch, length, dtype=candidate_probs.dtype)
    for b in range(batch):
        for i in range(length):
            parts = [energy_model.tok_emb.weight[tokens[b, : i + 1]], (candidate_probs[b, i] @ cand_weight)[None]]
            if model.cfg.architecture.variant == "time_embed":
                step_row = min(step, model.cfg.thinking.mcmc_steps - 1)
                parts.insert(0, energy_model.step_tokens[step_row][None])
            out[b, i] = causal_lm_last_energy(model, torch.cat(parts), step)
    return out
