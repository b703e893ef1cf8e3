"""EGNN adapter: relax the coordinate update of each EGNN block (Satorras, Hoogeboom, Welling 2021).

A block's coordinate update is recognised by its shape, not its class: a module
with ``coord_mlp`` and ``velocity_mlp`` submodules, an integer ``hidden`` and
``forward(h, x, v, messages, edge_index) -> Δx``, as ``equirelax.models.egnn.CoordinateUpdate``
(the reference code's ``E_GCL_vel``). The branch reads the node features h and
the *raw* coordinates and velocities (as the CR/ACE N-body code does), which
breaks rotations and translations, and adds γ·f_neq(h, x, v) to the update.
EGNN's update has no weights a projected branch could be folded into, so export
drops the branches (γ := 0): the plain EGNN again, E(3)-equivariant.
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, LayerSpec


def is_coordinate_update(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "coord_mlp", None), nn.Module)
            and isinstance(getattr(module, "velocity_mlp", None), nn.Module)
            and isinstance(getattr(module, "hidden", None), int))


class EGNNAdapter(Adapter):
    name = "egnn"

    def matches(self, model):
        return any(is_coordinate_update(m) for m in model.modules())

    def candidates(self, model):
        return {name: m for name, m in model.named_modules() if is_coordinate_update(m)}

    def spec(self, module):
        if not is_coordinate_update(module):
            raise TypeError(f"equirelax: the egnn adapter cannot relax {type(module).__name__}")
        # forward(h, x, v, messages, edge_index); the branch reads h, the raw coordinates and the velocities
        return LayerSpec(
            arg_irreps=(f"{module.hidden}x0e", "1x1o", "1x1o", f"{module.hidden}x0e", None),
            branch_args=(0, 1, 2),
            irreps_out="1x1o",
            mergeable=False,
        )
