"""Controller base class: option validation and shared per-step helpers."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl


class Controller:
    """A controller steers the per-layer levels γ_i.

    Subclasses declare ``name``, ``defaults`` (every accepted option with its
    default), ``learnable_gamma`` (γ is an ``nn.Parameter`` trained by the host
    optimizer) and what the layers must record each step (``needs_inputs``,
    ``needs_probe``: RECM's probing steps). They implement the hooks of :mod:`equirelax.core.hookspecs`.
    """

    name = "base"
    defaults: dict = {}
    learnable_gamma = False
    needs_inputs = False
    needs_probe = False
    has_step_state = True  # False: nothing to protect from a non-finite step, so no check is made

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"equirelax: controller {self.name!r} got unknown option(s) {unknown}; "
                f"its options are {sorted(self.defaults)}"
            )
        self.options = {**self.defaults, **options}
        self.validate()
        self.layers = {}

    def validate(self):
        """Raise ValueError for option values that cannot work."""

    @staticmethod
    def _is_integer(value) -> bool:
        """An int, not a bool (True is an int to Python, not a count to a user)."""
        return isinstance(value, int) and not isinstance(value, bool)

    def _positive(self, *names, allow_zero=False):
        for name in names:
            value = self.options[name]
            if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"equirelax: {self.name} option {name!r} must be a number {bound}, got {value!r}")

    def initial_gamma(self) -> float:
        return 1.0

    @hookimpl
    def equirelax_model_patched(self, handle, layers):
        self.layers = layers
        self.adapter = handle.adapter
        for layer in layers.values():
            layer.capture_inputs = self.needs_inputs
        self.setup(layers)

    def setup(self, layers):
        """Create per-layer state buffers."""

    @hookimpl
    def equirelax_metrics(self, handle):
        return {}

    @staticmethod
    def keep_if(finite: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Sync-free skip of a non-finite step."""
        return torch.where(finite, new, old)

    def stacked(self, key: str, names=None) -> torch.Tensor:
        """The scalar state ``key`` of the layers ``names`` (default: all) as one tensor: a controller's per-layer
        arithmetic then runs once for every layer (a small GPU step is bound by its kernel launches)."""
        return torch.stack([self.layers[name].state(key) for name in (names or self.layers)])

    def write_back(self, key: str, values: torch.Tensor, names=None):
        """Inverse of ``stacked``: each layer's state ``key`` set from ``values`` (one fused copy on a GPU)."""
        torch._foreach_copy_([self.layers[name].state(key) for name in (names or self.layers)], list(values.unbind()))
