"""μP (the maximal update parametrization) for both kinds, relative to a base width.

`model.parametrization: mup` makes hyperparameters tuned on a narrow proxy (the `mup.base_dim` model) transfer
to wider ones (Yang et al., Tensor Programs V, arXiv:2203.03466; microsoft/mup's rules for Adam). With
m = dim / base_dim, every weight plays one of four roles, known from where it sits in the model:

    role     weights                                          init std            Adam LR   AdamW decay
    matrix   block wq wk wv wo w1 w3 w2, adaLN linears        SP(base) / sqrt(m)  LR / m    wd * m
    vector   tok_emb, cand_proj, step tables, norms, biases   SP(base)            LR        wd
    readout  energy_head (EBT), head (Transformer++)          SP(base)            LR        wd
    fixed    alpha, the Langevin std (0-d)                    as SP               as SP     as SP

SP(base) is the std the model's init_scheme gives the same weight at the base width (xavier's depends on the
fans, scaled_normal's does not). A matrix's std is SP(base) * sqrt(base fan-in / fan-in), so under "reference"
(xavier, already ~ 1/sqrt(fan)) μP draws exactly what SP draws, and under scaled_normal it shrinks as
1/sqrt(m). decay is multiplied by m because torch's AdamW decays by lr * wd: the product stays the base's.
The readout is multiplied by output_mult / m in the forward (`readout_mult`), and attention scores use
sqrt(base_head_dim) / head_dim instead of 1/sqrt(head_dim) (`attention_scale`; the same where widths grow by
adding heads, the default). At m = 1 every factor is 1 and μP is SP bit for bit (tests/ebt/test_mup.py).

The candidate gradient. An EBT's candidate y lives in vocabulary space, whose size does not grow with width:
y -> phi(y) -> cand_proj (an input-like "vector" weight, fan-in V) -> blocks -> final norm -> readout. Under μP
every hidden coordinate stays Theta(1) in width and so does each coordinate's change after an update, and the
readout's 1/m takes the d-term sum in w.h back to Theta(1): E and its sensitivity to the Theta(1) candidate
embedding are Theta(1), hence dE/dy = J_phi^T cand_proj^T dE/de is Theta(1) per coordinate in width (V and
cand_proj's fan-in fixed). The update y <- y - alpha dE/dy then moves a candidate by the same amount at every
width with the same alpha: alpha needs no width exponent, nor does its LR multiplier (alpha is a scalar, "fixed").
At initialisation the readout's zero-mean weights give E and dE/dy of size m^(-1/2) (the usual vanishing μP
output at init, which the first updates replace by their Theta(1) contribution); under SP, E's sensitivity
instead grows with width once Adam has moved the readout (sum of d aligned Theta(lr) terms), so an SP-tuned
alpha overshoots at larger widths. `mup.alpha_width_exponent` scales alpha_init by m^c for testing other
choices; benchmarks/coord_check.py measures |dE/dy| and every layer's activation and update sizes across widths.

What was measured (`benchmarks.coord_check --candidate-update`: widths 64-512, 100 AdamW steps, 3 seeds; the
table is in benchmarks/README.md). The step itself, alpha * dE/dx less its vocabulary mean, at fixed candidates
after training: with alpha_init 5 (ebt_think, the quickstart), where a step moves a logit by a few units, μP
keeps it within 1.5-1.7x over the 8x range of widths (slopes -0.24, -0.05, -0.06) while SP's varies 3.4-15x
(slopes -0.89, -0.38, -0.31); alpha itself moves by the same amount at every width (from 5 to 4.72-4.80 after
100 steps under μP), so its LR multiplier needs no width factor either. With the S1 recipe's alpha_init 500 a
step moves logits by hundreds, the next softmax is one-hot, and μP's step grows as m^+0.57..+1.04: outside the
small-step picture the derivation assumes (a step's size past saturation no longer changes the candidate it
produces). Hence c = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ebt.config import ModelConfig

MATRIX, VECTOR, READOUT, FIXED = "matrix", "vector", "readout", "fixed"
_HIDDEN_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
_READOUTS = ("energy_head", "head")


@dataclass(frozen=True)
class Widths:
    """The model's widths and the base model's under μP (all equal under SP)."""

    dim: int
    base_dim: int
    ffn: int
    base_ffn: int
    head_dim: int
    base_head_dim: int
    output_mult: float = 1.0

    @property
    def width_mult(self) -> float:
        return self.dim / self.base_dim


def widths(cfg: ModelConfig) -> Widths:
    arch = cfg.architecture
    if cfg.parametrization != "mup":
        return Widths(arch.dim, arch.dim, arch.ffn_hidden, arch.ffn_hidden, arch.head_dim, arch.head_dim)
    base_dim = cfg.mup.base_dim
    return Widths(arch.dim, base_dim, arch.ffn_hidden, int(round(base_dim * arch.ffn_mult)), arch.head_dim,
                  cfg.mup.base_head_dim or arch.head_dim, cfg.mup.output_mult)


def module_role(name: str) -> str:
    """The role of a Linear/Embedding module by its dotted name in either kind's model (`blocks.0.wq`)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _READOUTS:
        return READOUT
    if leaf in _HIDDEN_LINEARS or _is_adaln(name):
        return MATRIX
    return VECTOR


def parameter_role(name: str, ndim: int) -> str:
    """The role of a parameter by its dotted name (`energy_model.blocks.0.wq.weight`): biases and norm gains of
    matrix modules are vectors (one width dimension), 0-d parameters are fixed."""
    if ndim == 0 or name.rsplit(".", 1)[-1] in ("alpha_raw", "langevin_std_raw"):
        return FIXED
    module, _, leaf = name.rpartition(".")
    role = module_role(module)
    return role if leaf == "weight" and ndim >= 2 else VECTOR


def base_fans(name: str, fan_out: int, fan_in: int, w: Widths) -> tuple[int, int]:
    """(fan_out, fan_in) the Linear `name` has in the base model."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _HIDDEN_LINEARS:
        fan_in_base = w.base_ffn if leaf == "w2" else w.base_dim
        fan_out_base = w.base_ffn if leaf in ("w1", "w3") else w.base_dim
        return fan_out_base, fan_in_base
    if _is_adaln(name):  # dim -> 6 dim (per block) or 2 dim (final)
        return fan_out // w.dim * w.base_dim, w.base_dim
    if leaf in _READOUTS:
        return fan_out, w.base_dim
    if leaf == "cand_proj":
        return w.base_dim, fan_in
    raise ValueError(f"ebt.parametrization: no μP role for the linear {name!r}; give it one here")


def _is_adaln(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "adaln_final" or (len(parts) >= 2 and parts[-1].isdigit() and parts[-2] == "adaln")


def init_std(name: str, sp_std: Callable[[str, int, int], float], fan_out: int, fan_in: int, w: Widths) -> float:
    """The μP std of Linear `name` given `sp_std(name, fan_out, fan_in)`, the init scheme's std for a shape."""
    out0, in0 = base_fans(name, fan_out, fan_in, w)
    std = sp_std(name, out0, in0)
    return std * math.sqrt(in0 / fan_in) if module_role(name) == MATRIX else std


def lr_scale(role: str, w: Widths) -> float:
    """Adam's LR multiplier for a role (matrix: 1/m)."""
    return 1.0 / w.width_mult if role == MATRIX else 1.0


def readout_mult(w: Widths) -> float:
    return w.output_mult / w.width_mult


def attention_scale(w: Widths) -> float | None:
    """sqrt(base_head_dim) / head_dim, or None (the usual 1/sqrt(head_dim)) where the two agree."""
    if w.head_dim == w.base_head_dim:
        return None
    return math.sqrt(w.base_head_dim) / w.head_dim
