"""Dimension rescaling: the tiny replica's unambiguous dimensions, and the map from each traced dimension value
(a single dimension or a product of two) to its value at the target size.

The tiny replica's batch, context, vocab and width are chosen so that no two products of dimensions with
different meanings share a value (`_tiny_dims`); `_rescaled_bytes` then reads every traced shape as a product of
those meanings and recomputes its bytes at the target dims. Anything that is not a scaled dimension (heads, K,
small constants) is kept as traced.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from ebt.config import ModelConfig

if TYPE_CHECKING:
    from planning.tracer import Trace


def _tiny_dims(cfg: ModelConfig, chunks: int = 1) -> dict[str, int]:
    """Small dimensions whose values, and the products of them that occur in shapes, are unambiguous: no two
    products with different meanings share a value, and none equals a dimension that does not scale (heads,
    K, small constants). With `chunks` > 1 the batch is chunks x C, C standing for the recompute chunk."""
    arch = cfg.architecture
    fixed = {1, 2, 3, 4} | {m * arch.n_heads for m in (1, 2, 3, 4)} | {cfg.thinking.mcmc_steps, arch.n_layers, chunks}
    batches = [(b, None) for b in (5, 7, 3)] if chunks == 1 else [(chunks * c, c) for c in (5, 7, 3, 11)]
    for head, (batch, chunk), seq, vocab in itertools.product((26, 10, 14, 22), batches, (13, 11, 17, 19),
                                                                (41, 37, 43)):
        dim = arch.n_heads * head
        dims = {"B": batch, "S": seq, "V": vocab, "D": dim, "F": max(1, int(round(dim * arch.ffn_mult))), "hd": head}
        if chunk is not None:
            dims["C"] = chunk
        table = _product_table(dims, arch.n_heads)
        if all(len(meanings) == 1 for meanings in table.values()) and not fixed & set(table):
            return dims
    raise ValueError(f"planner: found no unambiguous tiny replica for n_heads={arch.n_heads}")


def _atoms(dims: dict[str, int], heads: int) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Dimension atoms as (constant, base symbols). The base is the HALF head width r (rotary embedding works
    on halves), so the head width is (2, (r,)) and the width D = heads x head width is (2H, (r,)): products such
    as (batch x heads) x head width and batch x D are then recognised as the same quantity. F is its own
    symbol unless ffn_mult is 1."""
    h = heads
    if dims["F"] == dims["D"]:
        f, fc = "r", 2 * h
    else:
        f, fc = "F", 1
    # Chunked recompute: the batch is (chunks x C) so that batch-sized and chunk-sized dims are told apart.
    n = dims["B"] // dims["C"] if "C" in dims else 1
    b = "C" if "C" in dims else "B"
    d = 2 * h
    return {"B": (n, (b,)), "S": (1, ("S",)), "S1": (1, ("S1",)), "V": (1, ("V",)), "D": (d, ("r",)),
            "F": (fc, (f,)), "hd": (2, ("r",)), "hd2": (1, ("r",)), "2D": (2 * d, ("r",)), "3D": (3 * d, ("r",)),
            "4D": (4 * d, ("r",)), "2F": (2 * fc, (f,)), "BH": (n * h, (b,)), "BSD": (n * d, (b, "S", "r")),
            **({"C": (1, ("C",)), "CH": (h, ("C",))} if "C" in dims else {})}


def _base_values(dims: dict[str, int]) -> dict[str, int]:
    return {"B": dims["B"], "S": dims["S"], "S1": dims["S"] + 1, "V": dims["V"], "D": dims["D"], "F": dims["F"],
            "r": dims["hd"] // 2, "C": dims.get("C", dims["B"])}


def _product_table(dims: dict[str, int], heads: int) -> dict[int, set[tuple[int, tuple[str, ...]]]]:
    """Value at these dims -> the canonical meanings (constant, sorted base symbols) of products of <= 2 atoms
    (shapes hold single atoms, and flattened pairs such as batch x positions)."""
    atoms = _atoms(dims, heads)
    base = _base_values(dims)
    table: dict[int, set[tuple[int, tuple[str, ...]]]] = {}
    for r in (1, 2):
        for combo in itertools.combinations_with_replacement(sorted(atoms), r):
            const, symbols = 1, []
            for name in combo:
                const *= atoms[name][0]
                symbols.extend(atoms[name][1])
            value = const
            for symbol in symbols:
                value *= base[symbol]
            table.setdefault(value, set()).add((const, tuple(sorted(symbols))))
    return table


def _scale_table(tiny: dict[str, int], target: dict[str, int], heads: int) -> dict[int, float]:
    """Dimension value at tiny size -> its value at target size."""
    large = _base_values(target)
    out: dict[int, float] = {}
    for value, meanings in _product_table(tiny, heads).items():
        const, symbols = next(iter(meanings))
        scaled = const
        for symbol in symbols:
            scaled *= large[symbol]
        out[value] = scaled
    return out


def _target_dims(cfg: ModelConfig, batch: int) -> dict[str, int]:
    arch = cfg.architecture
    return {"B": batch, "S": arch.context_length, "V": arch.vocab_size, "D": arch.dim, "F": arch.ffn_hidden,
            "hd": arch.head_dim}


def _rescaled_bytes(trace: Trace, cfg: ModelConfig, batch: int, chunks: int, remat_chunk: int,
                    element_bytes) -> dict[int, float]:
    """Bytes of every traced tensor at the target size: each dimension rescaled, `element_bytes(traced size)`
    per element."""
    target = _target_dims(cfg, batch)
    if chunks > 1:
        target["C"] = remat_chunk
    table = _scale_table(trace.dims, target, cfg.architecture.n_heads)
    sizes: dict[int, float] = {}
    for ident, shape in trace.shapes.items():
        numel = 1.0
        for d in shape:
            numel *= table.get(d, d)
        sizes[ident] = numel * element_bytes(trace.element_size[ident])
    return sizes
