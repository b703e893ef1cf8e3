"""Adapters, found by name or automatically through the entry-point group ``equirelax.adapters``.

The engine never imports an adapter: each one (the package's own included) is an
entry point, loaded when a model needs it, so an environment without a host
package simply has no working adapter for it.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "equirelax.adapters"
GENERIC = "e3nn"  # any e3nn model: tried after every host-specific adapter
_registered: dict = {}
_instances: dict = {}


def register_adapter(name: str, adapter_class: type) -> None:
    """Make ``adapter_class`` available under ``name`` in this process (entry points do it for packages)."""
    _registered[name] = adapter_class
    _instances.pop(name, None)


def available_adapters() -> dict:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update(_registered)
    return found


def get_adapter(name: str):
    if name not in _instances:
        found = available_adapters()
        if name not in found:
            raise ValueError(f"equirelax: unknown adapter {name!r}; available: {sorted(found)}")
        adapter_class = found[name] if isinstance(found[name], type) else found[name].load()
        _instances[name] = adapter_class()
    return _instances[name]


def find_adapter(model):
    """The first adapter (host-specific ones before the generic e3nn one) that recognises ``model``."""
    names = sorted(available_adapters(), key=lambda n: (n == GENERIC, n))
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
