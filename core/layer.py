"""The relaxed layer: y = f_eq(x) + γ · f_neq(x), with the host module untouched."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .branches import LINEAR_KINDS, PARAMETER_NAMES, LinearBranch, LowRankBranch, saved_branch_kind
from .irreps import CARTESIAN_TO_E3NN, as_irreps
from .projection import HaarProjector

MODES = ("relaxed", "projected", "equivariant")
SAMPLE_ROWS = 256


class RelaxedLayer(nn.Module):
    """Wraps a host module ``base`` and adds ``gamma * branch(x)`` to its output.

    ``base`` is kept as is (same object, same parameters) under ``.base``; the
    branch reads the positional arguments named by ``branch_args`` (concatenated
    along the last axis) and, when ``uses_positions``, raw Cartesian positions
    set with :meth:`set_positions`. Controller state lives in buffers named
    ``ctrl_*`` so it is part of the host's own ``state_dict`` and pickles.
    """

    # d_out·d_in from which RECM's probes and ACE-resilient's gradient read skip forming dense maps
    BLOCKWISE_PROBE_ENTRIES = 1 << 16

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
        self.probing = False  # a RECM probing step: the probe weight stands in for the branch (set by RECM)
        # last probe: (⟨P⊥V_a x, P⊥V_b x⟩, ‖P⊥(V_a − V_b)x‖²/2, ‖f_eq(x)‖², ‖P⊥V_a x‖², ‖P⊥V_b x‖²)
        self.probe_sums: tuple | None = None
        self.probe_rows: tuple | None = None  # last probe: its input rows x and output rows f_eq(x), if recorded
        self.record_probe_rows = False  # set by RECM where its allowance reads the rows
        self.probe_leaves: tuple | None = None  # (A, B) leaves of the last probing step, for RECM's update
        # which probe map learns from each row's sample (True: V_b): candidates (per node, per edge) set per
        # probing step by RECM's SampleSplit, the one matching the layer's rows used
        self.sample_sides: tuple = ()
        self.cached_inputs: list[torch.Tensor] = []
        self.sample: tuple[torch.Tensor, torch.Tensor] | None = None  # (branch input, f_eq output) rows, last step
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

    def add_state(self, name: str, value: torch.Tensor, *, fresh_if_missing: bool = False) -> torch.Tensor:
        """Register (or reset) a controller buffer ``ctrl_<name>`` on this layer. ``fresh_if_missing``: state
        that a checkpoint written before it existed lacks; loading such a checkpoint keeps ``value`` (with a
        warning) instead of failing the host's strict ``load_state_dict``."""
        key = f"ctrl_{name}"
        if fresh_if_missing:
            self.__dict__.setdefault("fresh_if_missing", set()).add(key)
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

    def _branch_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_neq(x), P⊥f_neq(x)) without gradients; an MLP branch has no equivariant part, so both are f_neq(x)."""
        with torch.no_grad():
            if not self.has_projection:
                full = self.branch(x)
                return full, full
            weight = self.branch.weight.detach()
            return nn.functional.linear(x, weight), nn.functional.linear(x, weight - self.equivariant_weight(weight))

    def breaking_sums(self, x: torch.Tensor, relaxed_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖γ·P⊥f_neq(x)‖², ‖f_eq(x)‖²) over the rows, from the branch input and the relaxed output."""
        gamma = self.gamma.detach().to(x.dtype)
        full, off = self._branch_parts(x)
        base_out = relaxed_out.detach() - gamma * full
        return (gamma * off).pow(2).sum(), base_out.pow(2).sum()

    def breaking(self, x: torch.Tensor | None = None, base_out: torch.Tensor | None = None) -> float | None:
        """How non-equivariant the layer's output is: ‖γ·P⊥f_neq(x)‖ / ‖f_eq(x)‖ over the rows, i.e. the
        relaxed output's distance from the output of the model export ships, relative to the host layer's
        own output (an MLP branch has no equivariant part: all of it counts). Default rows: the last
        training step's. None before any training step."""
        if x is None:
            if self.__dict__.get("sample") is None:  # also a layer pickled before samples were kept
                return None
            x, base_out = self.sample
        gamma = self.gamma.detach().to(x.dtype)
        _, off = self._branch_parts(x)
        denominator = base_out.pow(2).sum()
        numerator = (gamma * off).pow(2).sum()
        return float(torch.sqrt(numerator / denominator)) if float(denominator) > 0 else float("nan")

    def add_probe_weight(self, rank: int):
        """Two maps V = B·A of rank ``rank`` (B zero, A random: V starts at zero) whose non-equivariant parts
        replace the branch's on probing steps, each fed one half of the batch's rows: their noise is
        independent, so ⟨V_a x, V_b x⟩ measures the correction the data asks for without the noise (see RECM).
        A low rank keeps them from fitting a finite training set's own noise. They are buffers, not
        parameters: RECM trains them itself (the host's optimizer, learning rate and schedule do not set
        how fast its measurement settles). Maps that exist already (a handle re-attached to a copied or
        loaded model) keep their trained values."""
        for name in ("probe_A", "probe_B"):  # models saved when the maps were parameters
            if self._parameters.get(name) is not None:
                self.register_buffer(name, self._parameters.pop(name).detach())
        if self._buffers.get("probe_A") is not None:
            return
        d_out, d_in = self.irreps_out.dim, self.branch_irreps_in.dim
        generator = torch.Generator().manual_seed(0)
        A = torch.randn(2, rank, d_in, generator=generator, dtype=torch.float64) / d_in**0.5
        B = torch.zeros(2, d_out, rank, dtype=torch.float64)
        for name, value in (("probe_A", A), ("probe_B", B)):
            self.register_buffer(name, value.to(dtype=self.gamma.dtype, device=self.gamma.device))

    @property
    def dense_is_cheaper(self) -> bool:
        """Whether this layer's maps are small enough that dense ops cost less than a few per irrep type."""
        return self.irreps_out.dim * self.branch_irreps_in.dim < self.BLOCKWISE_PROBE_ENTRIES

    @property
    def probe_weight(self) -> torch.Tensor | None:
        """The two probe maps [2, d_out, d_in] (None: no RECM on this layer), in units of the layer's
        output-to-input scale (see ``probing_forward``)."""
        A, B = self._buffers.get("probe_A"), self._buffers.get("probe_B")
        return None if A is None else B @ A

    def probing_forward(self, out: torch.Tensor, x: torch.Tensor, recording: bool) -> torch.Tensor:
        """f_eq(x) + γ·P(W)x + c·P⊥(V)x: the branch's equivariant part kept (not trained here) and its
        non-equivariant part replaced by a probe map V (V_a on the rows of one half of the samples, V_b on
        the other's: ``_second_map_rows``), trained at full strength whatever γ is. On large layers the
        projections are applied through their block scalars and the probe maps through their rank, so a
        probing step costs about what a plain one does (forming the dense maps made it ~1.6× a plain MACE
        step)."""
        rows = x.reshape(-1, x.shape[-1])
        # leaves for this step's backward: RECM reads their gradients and updates the buffers itself
        A, B = self.probe_A.detach().requires_grad_(recording), self.probe_B.detach().requires_grad_(recording)
        if recording:
            self.probe_leaves = (A, B)
        # V acts in units of c = rms(f_eq(x)) / rms(x): B's entries are then corrections relative to the layer's
        # output whatever the data's units, so RECM's step size means the same on every layer and host; c
        # scales the small B, not the activations
        tiny = torch.finfo(out.dtype).tiny
        B = B * (out.detach().pow(2).mean().clamp(min=tiny) / rows.detach().pow(2).mean().clamp(min=tiny)).sqrt()
        # small maps: a few dense ops cost less than a handful per irrep type; raw-position columns: the dense
        # projection zeroes them
        if self.uses_positions or self.dense_is_cheaper:
            V = B @ A
            off = V - torch.stack([self.equivariant_weight(V[0]), self.equivariant_weight(V[1])])
            first, second = nn.functional.linear(rows, off[0]), nn.functional.linear(rows, off[1])
            kept = (nn.functional.linear(rows, self.equivariant_weight(self.branch.weight.detach()))
                    if self.has_projection else None)
        else:
            projector = self.projector
            projected = projector.apply_lowrank(B, A, rows)  # the probe maps' equivariant parts, through rank 2
            first, second = (nn.functional.linear(nn.functional.linear(rows, A[k]), B[k]) - projected[k]
                             for k in (0, 1))
            kept = None
            if self.has_projection:  # the branch's equivariant part, its block scalars through its rank if any
                branch = self.branch
                kept = projector.apply_coefficients(
                    [projector.lowrank_coefficients(branch.B.detach(), branch.A.detach())
                     if isinstance(branch, LowRankBranch) else projector.coefficients(branch.weight.detach())],
                    rows)[0]
        correction = torch.where(self._second_map_rows(x)[:, None], second, first)
        if recording:
            first, second = first.detach(), second.detach()
            self.probe_sums = ((first * second).sum(), (first - second).pow(2).sum() / 2, out.detach().pow(2).sum(),
                               first.pow(2).sum(), second.pow(2).sum())
            if self.__dict__.get("record_probe_rows"):  # (layers saved before the flag existed lack it)
                self.probe_rows = (rows.detach(), out.detach().reshape(-1, out.shape[-1]))
        if kept is not None:
            correction = correction + self.gamma.detach().to(x.dtype) * kept
        return out + correction.reshape(*x.shape[:-1], -1)

    def _second_map_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per row of ``x``, whether V_b (not V_a) learns from it: by the row's sample where one of the batch's
        candidate sides (per node, per edge) matches ``x``'s leading axis (each sample's rows on one side, the
        same in every epoch), else the second half of the rows."""
        candidates, self.sample_sides = self.__dict__.get("sample_sides") or (), ()  # one batch's, one forward
        for sides in candidates:
            if x.dim() >= 2 and sides.shape[0] == x.shape[0]:
                return sides.to(x.device).reshape(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1]).reshape(-1)
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        return torch.arange(rows, device=x.device) >= rows // 2

    def probes_now(self) -> bool:
        """Whether a forward now probes: on RECM's probing step, and only a training forward. One under
        no_grad, or a host's evaluation in train mode with its parameters frozen (MACE validates so, and RECM
        may be mid-schedule then), sees the relaxed model."""
        return self.probing and self._buffers.get("probe_A") is not None and self.trains_now()

    def trains_now(self) -> bool:
        """Whether a forward is a training one: train mode, gradients recorded and some of the layer's parameters
        trainable (not a forward under no_grad, nor a host's evaluation in train mode with its parameters frozen,
        as MACE validates). Only such forwards probe, give CR its rows and the symmetry map its sample."""
        return self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    # ----------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        recording = self.training and torch.is_grad_enabled()
        probing = self.probes_now()
        if self.mode == "equivariant" and not probing:
            return out
        x = self.branch_input(args)
        training = probing or (recording and self.trains_now())  # (a probing forward is a training one)
        if training and self.capture_inputs:
            self.cached_inputs.append(x.detach())
        if probing:
            return self.probing_forward(out, x, recording)
        if training:  # a few rows, for the symmetry-breaking level (a copy, not a view)
            self.sample = (x.detach()[:SAMPLE_ROWS].clone(), out.detach()[:SAMPLE_ROWS].clone())
        gamma = self.gamma.to(out.dtype)
        if self.mode == "projected":
            return out + gamma * self.projected_branch(x)
        if type(self.branch) is LinearBranch:  # fused: scale the small matrix, not the activations
            return out + nn.functional.linear(x, gamma * self.branch.weight)
        if recording and self.__dict__.get("tap_gradient") and self.branch.B.requires_grad:  # (a host's
            return out + self.tapped_branch(x, gamma)  # evaluation may freeze the parameters: no tap then)
        return out + gamma * self.branch(x)

    def tapped_branch(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """γ·f_neq(x) for a low-rank branch, plus zero leaves whose gradients hold what ACE-resilient reads of H,
        the gradient on the map the layer adds (every path to the loss, forces included, as a dense W's
        gradient), on layers whose host weights cannot give it (no exact merge plan, or frozen): on small layers
        a dense zero map (``dense``: H itself, the branch applied as γ·B·A + 0 in one matmul); on large ones,
        without forming B·A, a zero ``shift`` on γ (⟨H, W⟩) and the zero block scalars of an equivariant map
        (``blocks``: H's block traces, so ⟨H, P(W)⟩ = Σ ⟨∂J/∂blocks, blocks of W⟩), at the cost of one
        equivariant map per row."""
        options = dict(dtype=x.dtype, device=x.device, requires_grad=True)
        if self.dense_is_cheaper:
            zero = torch.zeros(self.irreps_out.dim, self.branch_irreps_in.dim, **options)
            self.tapped = {"dense": zero}
            return nn.functional.linear(x, gamma * self.branch.weight + zero)
        shift = torch.zeros((), **options)
        blocks = [torch.zeros(out_idx.shape[0], in_idx.shape[0], **options)
                  for out_idx, in_idx in self.projector.blocks]
        self.tapped = {"shift": shift, "blocks": blocks}
        zero = self.projector.apply_coefficients([blocks], x.reshape(-1, x.shape[-1]))[0]
        return (gamma + shift) * self.branch(x) + zero.reshape(*x.shape[:-1], -1)

    def __getstate__(self):
        # per-step caches and device-side index copies are not part of a saved model
        state = self.__dict__.copy()
        state.update(cached_inputs=[], _positions=None, _projector=None, _handle=None, sample=None, probe_sums=None,
                     probe_rows=None, probe_leaves=None, tapped=None, sample_sides=())
        state.update(probing=False)  # a saved model is never mid-probe; RECM sets it on resume
        return state

    def clear_step_cache(self):
        self.cached_inputs.clear()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = {key[len(prefix + "branch."):] for key in state_dict if key.startswith(prefix + "branch.")}
        kind = getattr(self.branch, "kind", None)
        if saved and kind in PARAMETER_NAMES and not saved <= PARAMETER_NAMES[kind]:
            found = saved_branch_kind(saved) or "unknown"
            raise ValueError(f"equirelax: {prefix.rstrip('.') or 'the layer'} was saved with a {found} branch but "
                             f"this model builds a {kind} branch; set branch: {found} in the relax settings (the "
                             "default branch is lowrank; earlier versions defaulted to linear)")
        if any(key.startswith(prefix + "ctrl_") for key in state_dict):  # a relaxed checkpoint, maybe an older one
            fresh = self.__dict__.get("fresh_if_missing", ())
            missing = sorted(key for key in fresh if prefix + key not in state_dict)
            for key in missing:
                state_dict[prefix + key] = self._buffers[key].detach().clone()
            if missing:
                warnings.warn(f"equirelax: {prefix.rstrip('.') or 'the layer'}: the checkpoint has no "
                              f"{', '.join(missing)} (saved by an earlier version); that controller state starts "
                              "afresh", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"branch={getattr(self.branch, 'kind', type(self.branch).__name__)}, irreps_in={self.branch_irreps_in}, "
            f"irreps_out={self.irreps_out}, group={self.group}, mode={self.mode}"
        )
