"""What an adapter tells the core about a host's layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.samples import row_sides, structure_sides


@dataclass
class LayerSpec:
    """How one host layer is relaxed.

    arg_irreps: irreps of each positional argument of the layer's forward
        (None for arguments that do not rotate, e.g. external weights).
    branch_args: indices of the positional arguments the branch reads
        (concatenated along the last axis).
    irreps_out: irreps of the layer's output.
    mergeable: whether ``merge`` can fold a projected linear branch into the
        host layer's own weights.
    """

    arg_irreps: tuple
    branch_args: tuple
    irreps_out: object
    mergeable: bool = False


class Adapter:
    """Knows a host model family: which layers to relax, how, and how to merge back."""

    name = "base"
    # the module classes this adapter relaxes; adapters that choose layers by other rules override the two below
    layer_types: tuple = ()

    def matches(self, model: nn.Module) -> bool:
        """True when this adapter should be chosen automatically for ``model``."""
        return bool(self.layer_types) and any(isinstance(m, self.layer_types) for m in model.modules())

    def candidates(self, model: nn.Module) -> dict:
        """``{qualified name: module}`` of every layer this adapter can relax."""
        if not self.layer_types:
            raise NotImplementedError
        return {name: m for name, m in model.named_modules() if isinstance(m, self.layer_types)}

    def default_targets(self, model: nn.Module) -> dict:
        return self.candidates(model)

    def spec(self, module: nn.Module) -> LayerSpec:
        raise NotImplementedError

    def short_name(self, name: str) -> str:
        """The layer's name in logs, reports and plots: the module path without the host's fixed wrappers."""
        return name

    # where a host's batch (a dict or graph-data object) keeps the atoms' positions, each atom's structure and
    # the edges ([2, n_edges]; an edge takes the side of the node in its first row, the sender in MACE)
    positions_key = "positions"
    batch_key = "batch"
    edge_key = "edge_index"

    def sample_sides(self, args: tuple):
        """Which of RECM's two probe maps learns from each sample of the batch the model is called on (bool per
        row of the relaxed layers' inputs, or None: split by position): a hash of each sample's raw input, the
        model's first positional argument (``equirelax.core.samples``). A tensor: one sample per index along
        its first axis. A host batch with positions: one sample per structure, each of its atoms on the
        structure's side."""
        inputs = args[0] if args else None
        if isinstance(inputs, torch.Tensor):
            return row_sides(inputs) if inputs.dim() >= 1 and inputs.shape[0] > 0 else None
        positions, batch = _lookup(inputs, self.positions_key), _lookup(inputs, self.batch_key)
        return None if positions is None else structure_sides(positions, batch)

    def edge_index(self, args: tuple):
        """The batch's edges ``[2, n_edges]`` (None: none found), so that a layer whose rows are edges gives
        each edge its sender's side: ``edge_key`` of a host batch, or a plain model's first ``[2, n]``
        integer argument."""
        if args and not isinstance(args[0], torch.Tensor):
            edges = _lookup(args[0], self.edge_key)
            return edges if edges is not None and edges.dim() == 2 and edges.shape[0] == 2 else None
        return next((arg for arg in args[1:] if isinstance(arg, torch.Tensor) and not arg.is_floating_point()
                     and arg.dim() == 2 and arg.shape[0] == 2), None)

    def merge(self, layer, weight) -> None:
        """Fold ``weight`` (dense [dim_out, dim_in_features], equivariant) into ``layer.base``."""
        raise NotImplementedError

    def merge_plan(self, layer):
        """A device-side, sync-free ``apply(weight)`` that adds an equivariant dense ``weight`` into
        ``layer.base`` during training, or None when the host layer cannot take it exactly. A plan that also
        has ``add_coefficients(blocks)`` (the map's block scalars, as ``layer.projector`` gives them) lets ACE
        merge a low-rank branch without forming its dense map, and one with ``gradient_along(blocks)`` (the
        loss's derivative along that map, from the host weights' gradient, or None) lets ACE-resilient read a
        low-rank branch's task gradient without extra work in the training step (e3nn's ``MergePlan``)."""
        return None


def _lookup(inputs, key):
    """``inputs[key]`` when ``inputs`` is a dict-like batch holding a tensor there, else None."""
    try:
        value = inputs[key]
    except (KeyError, TypeError, IndexError, AttributeError):
        return None
    return value if isinstance(value, torch.Tensor) else None
