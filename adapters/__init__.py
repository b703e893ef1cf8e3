"""Host adapters, one module per model family; the engine finds them by name or automatically
(``equirelax.core.registry``, entry-point group ``equirelax.adapters``)."""

from ..core.registry import available_adapters, find_adapter, get_adapter, register_adapter
from .base import Adapter, LayerSpec

__all__ = ["Adapter", "LayerSpec", "available_adapters", "find_adapter", "get_adapter", "register_adapter"]
