"""Host adapters, one module per model family, found by name or automatically."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .base import Adapter, LayerSpec

ENTRY_POINT_GROUP = "equirelax.adapters"
# Most specific first: a host adapter wins over the generic e3nn one when both match.
BUILTIN = {
    "mace": "equirelax.adapters.mace:MaceAdapter",
    "nequip": "equirelax.adapters.nequip:NequipAdapter",
    "egnn": "equirelax.adapters.egnn:EGNNAdapter",
    "e3nn": "equirelax.adapters.e3nn:E3nnAdapter",
}
_instances: dict = {}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def available_adapters() -> dict:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_adapter(name: str) -> Adapter:
    if name not in _instances:
        found = available_adapters()
        if name not in found:
            raise ValueError(f"equirelax: unknown adapter {name!r}; available: {sorted(found)}")
        _instances[name] = _load(found[name])()
    return _instances[name]


def find_adapter(model) -> Adapter:
    """The first adapter (host-specific ones before the generic e3nn one) that recognises ``model``."""
    names = sorted(available_adapters(), key=lambda n: n == "e3nn")
    for name in names:
        try:
            adapter = get_adapter(name)
        except ImportError:
            continue  # that host is not installed in this environment
        if adapter.matches(model):
            return adapter
    raise ValueError(
        f"equirelax: no adapter recognises a {type(model).__name__}: it holds no e3nn o3.Linear or "
        f"o3.TensorProduct layer (adapters: {sorted(available_adapters())})"
    )


__all__ = ["Adapter", "LayerSpec", "get_adapter", "find_adapter", "available_adapters"]
