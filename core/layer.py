"""The relaxed layer: y = f_eq(x) + γ · f_neq(x), with the host module untouched."""

from __future__ import annotations

import torch
from torch import nn

from .branches import LINEAR_KINDS, LinearBranch
from .irreps import CARTESIAN_TO_E3NN, as_irreps
from .projection import HaarProjector

MODES = ("relaxed", "projected", "equivariant")


class RelaxedLayer(nn.Module):
    """Wraps a host module ``base`` and adds ``gamma * branch(x)`` to its output.

    ``base`` is kept as is (same object, same parameters) under ``.base``; the
    branch reads the positional arguments named by ``branch_args`` (concatenated
    along the last axis) and, when ``uses_positions``, raw Cartesian positions
    set with :meth:`set_positions`. Controller state lives in buffers named
    ``ctrl_*`` so it is part of the host's own ``state_dict`` and pickles.
    """

    def __init__(
        self,
        base: nn.Module,
        branch: nn.Module,
        *,
        arg_irreps,
        branch_args,
        irreps_out,
        gamma: float,
        learnable_gamma: bool,
        group: str = "O3",
        uses_positions: bool = False,
        adapter: str = "e3nn",
        mergeable: bool = False,
    ):
        super().__init__()
        self.base = base
        self.branch = branch
        self.arg_irreps = tuple(None if ir is None else str(as_irreps(ir)) for ir in arg_irreps)
        self.branch_args = tuple(branch_args)
        self.irreps_out = as_irreps(irreps_out)
        feature_irreps = as_irreps("+".join(self.arg_irreps[i] for i in self.branch_args))
        self.feature_dim = feature_irreps.dim
        self.branch_irreps_in = as_irreps(feature_irreps + as_irreps("1x1o")) if uses_positions else feature_irreps
        self.group = group
        self.uses_positions = uses_positions
        self.adapter = adapter
        self.mergeable = mergeable
        self.mode = "relaxed"
        value = torch.tensor(float(gamma))
        if learnable_gamma:
            self.gamma = nn.Parameter(value)
        else:
            self.register_buffer("gamma", value)
        self.capture_inputs = False
        self.use_probe = False
        self.probing = False  # training step that runs the equivariant part alone (set by RECM)
        self.cached_inputs: list[torch.Tensor] = []
        self.probes: list[torch.Tensor] = []
        self._positions: torch.Tensor | None = None
        self._projector: HaarProjector | None = None
        self._handle = None  # the RelaxHandle driving this layer (not saved with the model)
        self.relax_config: dict | None = None

    # ----------------------------------------------------------------- helpers
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None or name.startswith("ctrl_"):
                raise
            return getattr(base, name)  # host code may read e.g. ``layer.irreps_out``

    @property
    def projector(self) -> HaarProjector:
        if self._projector is None:
            self._projector = HaarProjector(self.branch_irreps_in, self.irreps_out, self.group)
        return self._projector

    def add_state(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Register (or reset) a controller buffer ``ctrl_<name>`` on this layer."""
        key = f"ctrl_{name}"
        device = self.gamma.device
        value = value.to(device)
        if key in self._buffers:
            self._buffers[key] = value
        else:
            self.register_buffer(key, value)
        return self._buffers[key]

    def state(self, name: str) -> torch.Tensor:
        return self._buffers[f"ctrl_{name}"]

    def set_positions(self, positions: torch.Tensor | None):
        self._positions = positions

    def set_mode(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"equirelax: unknown layer mode {mode!r}; choose one of {MODES}")
        self.mode = mode

    def branch_input(self, args) -> torch.Tensor:
        features = [args[i] for i in self.branch_args]
        if len(features) > 1:
            shape = torch.broadcast_shapes(*(f.shape[:-1] for f in features))
            features = [f.expand(*shape, f.shape[-1]) for f in features]
        x = features[0] if len(features) == 1 else torch.cat(features, dim=-1)
        if self.uses_positions:
            if self._positions is None:
                raise RuntimeError(
                    "equirelax: this layer's branch is fed raw positions, but none were given for this "
                    "forward pass; call handle.set_positions(positions) before the model's forward"
                )
            positions = self._positions[..., list(CARTESIAN_TO_E3NN)].to(x.dtype)
            try:
                shape = torch.broadcast_shapes(x.shape[:-1], positions.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"equirelax: positions of shape {tuple(self._positions.shape)} do not match this layer's "
                    f"features of shape {tuple(x.shape)}: give one row of 3 Cartesian coordinates per feature row"
                ) from None
            x = torch.cat([x.expand(*shape, x.shape[-1]), positions.expand(*shape, 3)], dim=-1)
        return x

    @property
    def has_projection(self) -> bool:
        """Whether the branch has an exact equivariant part (a linear map; MLP branches have none)."""
        return isinstance(self.branch, LINEAR_KINDS)

    def equivariant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """P(W) under E(3): the Haar projection, with raw-position columns zeroed (a linear map of raw
        positions is never translation invariant). This is what projected mode applies and export merges."""
        projected = self.projector(weight)
        if self.uses_positions:
            projected = torch.cat([projected[:, : self.feature_dim],
                                   projected.new_zeros(projected.shape[0], weight.shape[1] - self.feature_dim)], 1)
        return projected

    def projected_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``P(f_neq)(x)`` for linear branches (closed form, deterministic); a branch without an exact
        equivariant part (MLP) is dropped, as export drops it."""
        if not self.has_projection:
            return x.new_zeros(*x.shape[:-1], self.irreps_out.dim)
        return nn.functional.linear(x, self.equivariant_weight(self.branch.weight))

    def probing_branch(self, x: torch.Tensor) -> torch.Tensor:
        """γ·P(W)x: the equivariant part the branch learned, kept on probing steps (not trained there)."""
        weight = self.gamma.detach().to(x.dtype) * self.equivariant_weight(self.branch.weight.detach())
        return nn.functional.linear(x, weight)

    # ----------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        recording = self.training and torch.is_grad_enabled()
        probing = self.probing and self.training
        if self.mode == "equivariant" and not (recording and probing and self.use_probe):
            return out
        x = self.branch_input(args)
        if recording and self.capture_inputs:
            self.cached_inputs.append(x.detach())
        probe = None
        if recording and self.use_probe:
            # a zero matrix whose gradient is dL/dW of a virtual linear branch, whatever γ is
            probe = torch.zeros(self.irreps_out.dim, x.shape[-1], dtype=x.dtype, device=x.device, requires_grad=True)
            self.probes.append(probe)
        if probing:
            out = out + self.probing_branch(x) if isinstance(self.branch, LINEAR_KINDS) else out
            return out if probe is None else out + nn.functional.linear(x, probe)
        if self.mode == "equivariant":
            return out if probe is None else out + nn.functional.linear(x, probe)
        gamma = self.gamma.to(out.dtype)
        if self.mode == "projected":
            return out + gamma * self.projected_branch(x)
        if type(self.branch) is LinearBranch:  # fused: scale the small matrix, not the activations
            weight = gamma * self.branch.weight
            if probe is not None:
                weight = weight + probe
            return out + nn.functional.linear(x, weight)
        delta = gamma * self.branch(x)
        if probe is not None:
            delta = delta + nn.functional.linear(x, probe)
        return out + delta

    def __getstate__(self):
        # per-step caches and device-side index copies are not part of a saved model
        state = self.__dict__.copy()
        state.update(cached_inputs=[], probes=[], _positions=None, _projector=None, _handle=None)
        state.update(probing=False, use_probe=False)  # a saved model is never mid-probe; RECM sets it on resume
        return state

    def clear_step_cache(self):
        self.cached_inputs.clear()
        self.probes.clear()

    def extra_repr(self) -> str:
        return (
            f"branch={getattr(self.branch, 'kind', type(self.branch).__name__)}, irreps_in={self.branch_irreps_in}, "
            f"irreps_out={self.irreps_out}, group={self.group}, mode={self.mode}"
        )
