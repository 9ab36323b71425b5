"""The size table shared by EBT and Transformer++ (the EBT paper's sizes; FFN hidden = dim x ffn_mult).

`peak_lr` is the reference's per-size peak learning rate (the comments of model_sizes in the authors'
model/model_utils.py, from Mamba's where it applies); EBT and Transformer++ runs use the same value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SizeSpec:
    n_layers: int
    n_heads: int
    dim: int
    peak_lr: float


SIZES: dict[str, SizeSpec] = {
    "4xs": SizeSpec(n_layers=2, n_heads=2, dim=128, peak_lr=2.4e-3),
    "3xs": SizeSpec(n_layers=4, n_heads=4, dim=256, peak_lr=1.8e-3),
    "xxs": SizeSpec(n_layers=6, n_heads=6, dim=384, peak_lr=1.2e-3),
    "xs": SizeSpec(n_layers=12, n_heads=6, dim=384, peak_lr=9.0e-4),
    "small": SizeSpec(n_layers=12, n_heads=12, dim=768, peak_lr=6.0e-4),
    "medium": SizeSpec(n_layers=24, n_heads=16, dim=1024, peak_lr=3.0e-4),
    "large": SizeSpec(n_layers=24, n_heads=16, dim=1536, peak_lr=2.5e-4),
    "xl": SizeSpec(n_layers=24, n_heads=32, dim=2048, peak_lr=2.0e-4),
}
