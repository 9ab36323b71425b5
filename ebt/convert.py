"""Weights of the authors' models (alexiglad/EBT: EBT_NLP and Baseline_Transformer_NLP) in this project's layout.

`from_reference(state_dict, cfg)` maps a reference state dict (a Lightning checkpoint's `model.` entries, with
that prefix removed) onto `build_model(cfg).state_dict()` names. The mapping is exact and linear (renames, a
transpose and a permutation), so it maps gradients too, which is how the parity tests compare them:
- rotary layout: the reference rotates interleaved feature pairs (2j, 2j+1), this project half-split pairs
  (j, j + d/2) with the same frequency j; permuting each head's rows of wq and wk turns one into the other
  (q.k is unchanged because the same permutation applies to both);
- vocab_to_embed is an nn.Linear(V, D) in both, cand_proj here;
- adaLN: adaLN_modulation.1 (after the SiLU) is `adaln[i]`, the final layer's is `adaln_final`.
"""

from __future__ import annotations

import torch

from ebt.config import ModelConfig


def rotary_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that takes interleaved-pair rotary projections to half-split ones, head by head."""
    within = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return torch.cat([h * head_dim + within for h in range(n_heads)])


def _block_map(prefix: str, ours: str) -> dict[str, str]:
    pairs = {
        "attention.wq.weight": "wq.weight", "attention.wk.weight": "wk.weight", "attention.wv.weight": "wv.weight",
        "attention.wo.weight": "wo.weight", "feed_forward.w1.weight": "w1.weight",
        "feed_forward.w2.weight": "w2.weight", "feed_forward.w3.weight": "w3.weight",
        "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    }
    return {f"{prefix}.{theirs}": f"{ours}.{mine}" for theirs, mine in pairs.items()}


def key_map(cfg: ModelConfig) -> dict[str, str]:
    """Reference parameter name -> this project's, for build_model(cfg)."""
    if cfg.kind == "transformer":
        names = {"embeddings.weight": "tok_emb.weight", "transformer.norm.weight": "final_norm.weight",
                 "output.weight": "head.weight"}
        for i in range(cfg.architecture.n_layers):
            names.update(_block_map(f"transformer.layers.{i}", f"blocks.{i}"))
        return names
    e = "energy_model"
    names = {"alpha": "alpha_raw", "embeddings.weight": f"{e}.tok_emb.weight",
             "transformer.norm.weight": f"{e}.final_norm.weight"}
    if cfg.thinking.langevin_learnable:
        names["langevin_dynamics_noise_std"] = "langevin_std_raw"
    if not cfg.architecture.tie_candidate_embedding:
        names["vocab_to_embed.weight"] = f"{e}.cand_proj.weight"
    for i in range(cfg.architecture.n_layers):
        names.update(_block_map(f"transformer.layers.{i}", f"{e}.blocks.{i}"))
    if cfg.architecture.variant == "adaln":
        names["transformer.final_layer.linear.weight"] = f"{e}.energy_head.weight"
        names["transformer.time_embeddings.weight"] = f"{e}.step_emb.weight"
        for suffix in ("weight", "bias"):
            names[f"transformer.final_layer.adaLN_modulation.1.{suffix}"] = f"{e}.adaln_final.{suffix}"
            for i in range(cfg.architecture.n_layers):
                names[f"transformer.layers.{i}.adaLN_modulation.1.{suffix}"] = f"{e}.adaln.{i}.{suffix}"
    else:
        names["transformer.final_layer.weight"] = f"{e}.energy_head.weight"
        if cfg.architecture.variant == "time_embed":
            names["transformer.time_embeddings.weight"] = f"{e}.step_tokens"
    return names


def from_reference(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """This project's state dict for `cfg` from a reference one; extra reference entries (a frozen Langevin std)
    are dropped, a missing one raises KeyError naming it."""
    permutation = rotary_permutation(cfg.architecture.n_heads, cfg.architecture.head_dim)
    out = {}
    for theirs, ours in key_map(cfg).items():
        if theirs not in state:
            raise KeyError(f"reference state dict has no {theirs!r} (needed for {ours!r})")
        value = state[theirs]
        if theirs.endswith(("attention.wq.weight", "attention.wk.weight")):
            value = value[permutation]
        out[ours] = value.reshape(()) if ours == "alpha_raw" else value
    return out
