"""Test shorthand for nested model configs: `model_config(dim=8, mcmc_steps=3)` puts each key in its section.

Only tests use the flat shorthand, to keep their setup short; the package, YAML files and the CLI take the
sections (`model.thinking.mcmc_steps`), and a flat key there is refused (ebt.config.MOVED_KEYS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ebt.config import SECTIONS, ModelConfig

_SECTION_OF = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
_RENAMED = {"replay_capacity": ("replay", "capacity"), "replay_fraction": ("replay", "fraction"),
            "replay_top_k": ("replay", "top_k")}


def nested(**flat: Any) -> dict[str, Any]:
    """Flat model keys as the nested `model:` mapping (kind, size and parametrization stay at the top)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in ("kind", "size", "parametrization"):
            out[key] = value
        elif key in _RENAMED:
            section, name = _RENAMED[key]
            out.setdefault(section, {})[name] = value
        elif key in _SECTION_OF:
            out.setdefault(_SECTION_OF[key], {})[key] = value
        else:
            raise KeyError(f"not a model key: {key}")
    return out


def model_config(**flat: Any) -> ModelConfig:
    return ModelConfig.from_dict(nested(**flat))


def sized_config(size: str, **flat: Any) -> ModelConfig:
    return ModelConfig.from_dict({**nested(**flat), "size": size})
