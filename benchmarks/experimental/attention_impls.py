"""Double-backward-capable implementations of the candidate attention, benchmarked in benchmarks/attention.py.

All three compute ebt.attention.candidate_attention exactly (tests/ebt/test_second_order_attention.py):
- "explicit": the default in ebt.attention (scores against the real keys, one self score, one softmax).
- "sdpa_math": scaled_dot_product_attention over the concatenated key set [real keys | candidate keys] with a
  boolean mask (causal on the real part, diagonal on the candidate part), forced onto the MATH backend, the
  only SDPA backend with a double-backward formula.
- "function": a custom autograd.Function whose forward saves only its inputs (no [B,H,S,T+1] tensor) and whose
  backward recomputes the weights and is written in differentiable torch ops, so autograd can differentiate it
  again (second-order training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ebt.attention import candidate_attention


def _weights(q, k_self, k_real, bias):
    scale = q.shape[-1] ** -0.5
    real_scores = torch.matmul(q, k_real.transpose(-1, -2)) * scale + bias
    self_scores = (q * k_self).sum(-1, keepdim=True) * scale
    return torch.softmax(torch.cat((real_scores, self_scores), dim=-1), dim=-1)


class _CandidateAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_self, v_self, k_real, v_real, bias):  # type: ignore[override]
        weights = _weights(q, k_self, k_real, bias)
        real_length = k_real.shape[-2]
        out = torch.matmul(weights[..., :real_length], v_real) + weights[..., real_length:] * v_self
        ctx.save_for_backward(q, k_self, v_self, k_real, v_real, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # Plain differentiable ops on the saved inputs: under create_graph=True autograd records them, which is
        # what makes the second derivative (the EBT's outer backward) available.
        q, k_self, v_self, k_real, v_real, bias = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        real_length = k_real.shape[-2]
        weights = _weights(q, k_self, k_real, bias)
        w_real, w_self = weights[..., :real_length], weights[..., real_length:]
        grad_w_real = torch.matmul(grad_out, v_real.transpose(-1, -2))
        grad_w_self = (grad_out * v_self).sum(-1, keepdim=True)
        # softmax backward: dS = W * (dW - sum(dW * W))
        row = (grad_w_real * w_real).sum(-1, keepdim=True) + grad_w_self * w_self
        grad_s_real = w_real * (grad_w_real - row)
        grad_s_self = w_self * (grad_w_self - row)
        grad_q = (torch.matmul(grad_s_real, k_real) + grad_s_self * k_self) * scale
        grad_k_self = grad_s_self * q * scale
        grad_k_real = torch.matmul(grad_s_real.transpose(-1, -2), q) * scale
        grad_v_self = w_self * grad_out
        grad_v_real = torch.matmul(w_real.transpose(-1, -2), grad_out)
        grad_k_real = _sum_to(grad_k_real, k_real)
        grad_v_real = _sum_to(grad_v_real, v_real)
        return grad_q, grad_k_self, grad_v_self, grad_k_real, grad_v_real, None


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


def function_attention(q, k_self, v_self, k_real, v_real, bias):
    return _CandidateAttention.apply(q, k_self, v_self, k_real, v_real, bias)


def sdpa_math_attention(q, k_self, v_self, k_real, v_real, bias):
    candidates = q.shape[-2]
    keys = torch.cat((k_real, k_self), dim=-2)
    values = torch.cat((v_real, v_self), dim=-2)
    diagonal = torch.eye(candidates, dtype=torch.bool, device=q.device)
    mask = torch.cat((bias == 0, diagonal), dim=-1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


IMPLEMENTATIONS = {
    "explicit": candidate_attention,
    "sdpa_math": sdpa_math_attention,
    "function": function_attention,
}
