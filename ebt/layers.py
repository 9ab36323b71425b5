"""Llama-style building blocks shared by the EBT energy model and the Transformer++ baseline.

Everything here must support double backward: EBT training differentiates through the gradient of the energy
with respect to the candidates. That rules out fused kernels without double-backward formulas, so RMSNorm and
SwiGLU are written out in plain differentiable ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ebt.config import ModelConfig
from ebt.parametrization import attention_scale, init_std, widths


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-split form), tabulated once for every position the model can use."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        # Kept in fp64 and cast on use, so fp64 oracle tests see exact tables; not saved in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, H, T, head_dim] by the angles of `positions` [T].

        No bounds check here: the public API already limits lengths to context_length, and a data-dependent
        check would sync every call and break torch.compile graphs (index_select still raises if out of range).
        """
        cos = self.cos.index_select(0, positions).to(x.dtype)
        sin = self.sin.index_select(0, positions).to(x.dtype)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: multi-head attention and a bias-free SwiGLU MLP.

    The block exposes its pieces (norms, projections, MLP) rather than a single forward, because the EBT runs
    two streams through the same weights with different attention patterns; `ebt.streams` wires them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim, hidden = cfg.architecture.dim, cfg.architecture.ffn_hidden
        self.n_heads = cfg.architecture.n_heads
        # Attention's score scale: None is 1/sqrt(head_dim); μP's sqrt(base_head_dim)/head_dim where they differ.
        self.attn_scale = attention_scale(widths(cfg))
        self.attn_norm = RMSNorm(dim, cfg.architecture.norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = RMSNorm(dim, cfg.architecture.norm_eps)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * head_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split_heads(self.wq(x)), self.split_heads(self.wk(x)), self.split_heads(self.wv(x))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Initialise every linear and embedding of `module` by cfg.init_scheme; norms start at one.

    "reference": the EBT authors' (model_utils.init_whole_model_weights with xavier): xavier-normal linears,
    embeddings left at PyTorch's N(0, 1).
    "scaled_normal": GPT-2/Llama style N(0, init_std), residual outputs (wo, w2) scaled by 1/sqrt(2 n_layers)
    so the residual stream's variance does not grow with depth.
    Under `parametrization: mup` each linear's std is the scheme's std at the base width, times
    sqrt(base fan-in / fan-in) for the hidden matrices (ebt/parametrization.py): the same draws from the same
    generator, only the std differs, and at the base width it is the SP std itself.
    """
    arch = cfg.architecture
    residual_std = arch.init_std / math.sqrt(2 * arch.n_layers)
    mup = widths(cfg) if cfg.parametrization == "mup" else None

    def scheme_std(name: str, fan_out: int, fan_in: int) -> float:
        """The init scheme's std for linear `name` with these fans (SP)."""
        if arch.init_scheme == "reference":  # torch.nn.init.xavier_normal_'s std (gain 1), to the bit
            return math.sqrt(2.0 / float(fan_in + fan_out))
        return residual_std if name.endswith(("wo", "w2")) else arch.init_std

    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            fan_out, fan_in = sub.weight.shape
            if mup is None:
                std = scheme_std(name, fan_out, fan_in)
            else:
                std = init_std(name, scheme_std, fan_out, fan_in, mup)
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=1.0 if arch.init_scheme == "reference" else arch.init_std)
