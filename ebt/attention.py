"""The two attention patterns of an EBT, written so that neither needs mask surgery on V- or S^2-sized tensors.

Real stream: plain causal self-attention. It never depends on the candidates, so it is differentiated only
once even in second-order training (autograd.grad w.r.t. the candidates prunes it), and SDPA's fused kernels
are safe for it.

Candidate stream: candidate i attends to real keys 0..i (plus any prefix offset) and to its own key, nothing
else. Instead of building the reference's [real | candidate] sequence with a diagonal mask, the candidate
queries score the real keys with one matmul, append one self score per query, and take a single softmax over
the two. Every op here has a double-backward formula, on CPU and CUDA alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_length: int,
                     scale: float | None = None) -> torch.Tensor:
    """q [B,H,n,d] over k, v [B,H,past_length+n,d]: query t sees keys 0..past_length+t. `scale`: the score
    scale (None: 1/sqrt(d))."""
    new = q.shape[-2]
    if past_length == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if new == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    query_pos = torch.arange(new, device=q.device)[:, None] + past_length
    visible = query_pos >= torch.arange(past_length + new, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def visibility_bias(last_visible: torch.Tensor, real_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias [Sc, T]: 0 where real index j <= last_visible[c], -inf elsewhere."""
    real_index = torch.arange(real_length, device=last_visible.device)
    bias = torch.zeros(last_visible.shape[0], real_length, dtype=dtype, device=last_visible.device)
    return bias.masked_fill(real_index[None, :] > last_visible[:, None], float("-inf"))


def candidate_attention(
    q: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    k_real: torch.Tensor,
    v_real: torch.Tensor,
    bias: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Candidates q, k_self, v_self [B,H,Sc,d] attend to k_real, v_real [B,H,T,d] under `bias` and to themselves;
    scores scaled by `scale` (None: 1/sqrt(d))."""
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    real_scores = torch.matmul(q, k_real.transpose(-1, -2)) + bias
    self_scores = (q * k_self).sum(-1, keepdim=True)
    weights = torch.softmax(torch.cat((real_scores, self_scores), dim=-1), dim=-1)
    real_length = k_real.shape[-2]
    return torch.matmul(weights[..., :real_length], v_real) + weights[..., real_length:] * v_self
