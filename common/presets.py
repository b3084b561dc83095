"""Named configurations shipped with fedpriv (``common/presets/*.toml``).

A preset may name another with a top-level ``extends = "NAME"``; its settings are applied on
top of that preset's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpriv.common.config import read_toml
from fedpriv.common.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "quickstart"


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_layers(name: str) -> list[dict[str, Any]]:
    """The nested config layers of preset ``name``, base first."""
    layers: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = name
    while current is not None:
        if current in seen:
            raise ConfigError(f"preset '{name}' extends itself in a cycle")
        seen.add(current)
        path = PRESET_DIR / f"{current}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown preset '{current}'; available: {', '.join(available())}")
        layer = read_toml(path)
        current = layer.pop("extends", None)
        layers.insert(0, layer)
    return layers
