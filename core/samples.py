"""Which of RECM's two probe maps learns from a sample: a key of the sample's own raw input.

RECM's probe maps must learn from disjoint halves of the training set: two maps that both meet every
sample agree on what fits that finite set's own orientations, and a symmetric set then reads a level
(BENCHMARKS.md, "RECM on finite symmetric sets"). Splitting a batch's rows by position does not do it once
the host reshuffles its batches. So the split is by sample: a hash of each sample's raw input (a
structure's positions; a row of a plain model's input tensor), the same in every epoch, batch and rank,
whatever the order the host draws them in. A relaxed layer's rows are then assigned by the sample they
belong to (every atom of a structure to the same map).
"""

from __future__ import annotations

import torch
from torch import nn

PRIME = 2147483647  # 2**31 - 1: every product of two residues fits in int64
QUANTUM = 2.0**16  # raw values are hashed at this resolution (1.5e-5 Å for positions)
COLUMN_STRIDE = 40503
MIX = (48271, 16807)


def _residues(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float, ``[n, d]``) quantized and reduced mod PRIME, per entry (int64)."""
    quantized = torch.round(values.detach().to(torch.float64) * QUANTUM).clamp(-(2.0**52), 2.0**52)
    return torch.remainder(quantized.to(torch.int64), PRIME)


def _row_hash(values: torch.Tensor) -> torch.Tensor:
    """One residue per row of ``values`` [n, d]: a weighted sum of its entries' residues mod PRIME."""
    weights = (torch.arange(values.shape[-1], device=values.device, dtype=torch.int64) * COLUMN_STRIDE + 1) % PRIME
    return torch.remainder(_residues(values) * weights, PRIME).sum(-1) % PRIME


def _side(residues: torch.Tensor) -> torch.Tensor:
    """One bit of a scrambled residue: False for the first probe map, True for the second."""
    for factor in MIX:  # multiplication mod a prime permutes the residues: nearby inputs land far apart
        residues = residues * factor % PRIME
    return (residues >> 15) & 1 == 1


def id_sides(samples: torch.Tensor) -> torch.Tensor:
    """Integer sample ids (dataset indices, say): one side per id."""
    return _side(torch.remainder(samples.to(torch.int64), PRIME))


def row_sides(inputs: torch.Tensor) -> torch.Tensor:
    """A plain model's input ``[n, ...]``: one side per sample (index along the first axis), from all its values."""
    return _side(_row_hash(inputs.reshape(inputs.shape[0], -1)))


def structure_sides(positions: torch.Tensor, batch: torch.Tensor | None = None) -> torch.Tensor:
    """Atoms' positions ``[n_atoms, 3]`` and structure index ``batch`` ``[n_atoms]`` (None: one structure):
    one side per atom, the same for every atom of a structure (from the sum of its atoms' hashes, which does
    not depend on their order or on the batch). No host sync."""
    per_atom = _row_hash(positions)
    if batch is None:
        return _side(per_atom.sum() % PRIME).expand(per_atom.shape[0])
    per_structure = torch.zeros_like(per_atom).index_add_(0, batch.to(per_atom.device), per_atom) % PRIME
    return _side(per_structure)[batch]


class SampleSplit:
    """Forward pre-hook on a model relaxed under a probing controller: before a training forward on which
    some layer probes, gives each probing layer the side of every sample of the batch: from the ids given
    with ``handle.set_samples``, else from the inputs (``adapter.sample_sides``); and for layers whose rows
    are the batch's edges, each edge's sender's side (``adapter.edge_index``). A copied or pickled model
    keeps an inert hook (no layers); re-attaching a handle installs a live one."""

    def __init__(self, layers=(), adapter=None):
        self.layers = list(layers)
        self.adapter = adapter
        self.samples = None  # ids from handle.set_samples

    def __call__(self, module, args):
        if not module.training:
            return None
        probing = [layer for layer in self.layers if layer.probes_now()]  # (none on a forward that does not train)
        if probing:
            sides = id_sides(self.samples) if self.samples is not None else self.adapter.sample_sides(args)
            candidates = () if sides is None else (sides,)
            edges = None if sides is None else self.adapter.edge_index(args)
            if edges is not None:  # rows that are edges: the sender's side (clamped: never an indexing error)
                candidates += (sides[edges[0].to(sides.device).clamp(0, sides.shape[0] - 1)],)
            for layer in probing:
                layer.sample_sides = candidates
        return None

    def __reduce__(self):  # copies and saved models hold no live layers
        return (SampleSplit, ())


def remove_sample_split(model: nn.Module) -> None:
    """Remove every SampleSplit hook from ``model`` and its submodules (export leaves only the host's parts)."""
    for module in model.modules():
        for key in [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, SampleSplit)]:
            del module._forward_pre_hooks[key]


def install_sample_split(model: nn.Module, layers, adapter) -> SampleSplit:
    remove_sample_split(model)
    hook = SampleSplit(layers, adapter)
    # positional inputs only: a pickled model keeps its hooks' ids, and another process's new hooks may reuse
    # them, so an id marked "with kwargs" would make torch call someone else's hook with kwargs
    model.register_forward_pre_hook(hook)
    return hook
