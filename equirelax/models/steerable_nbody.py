"""A SEGNN-style steerable message-passing network for N-body systems, built from e3nn parts only.

Not SEGNN itself (Brandstetter et al. 2022) but the same shape, small enough
for a CPU: node features are steerable (scalars and vectors), messages are
tensor products of the sender's features with the spherical harmonics of the
relative position, weighted by an MLP of invariant edge scalars (|x_i − x_j|,
q_i q_j), and the output is a displacement vector (1x1o) added to the input
positions::

    f_i  = Linear(|v_i|, q_i, v_i)
    m_ij = TP_w(f_j, Y(x_i − x_j)),  w = MLP(|x_i − x_j|, q_i q_j)
    f_i ← f_i + Gate(Linear(f_i ⊕ mean_j m_ij))
    x_i ← x_i + Linear(f_i) → 1x1o

Every ``o3.Linear`` and tensor product of it is a layer the e3nn adapter can
relax (``equirelax.relax(model, ...)`` with the default targets): their
branches read the layer's own (equivariant) inputs, so a relaxed model can
learn a fixed direction, such as that of an external field. The model is
E(3)-equivariant: it sees relative positions only and the node scalars are
invariant. Runs with e3nn 0.4.4 and 0.6.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core._e3nn import o3


def _scatter_mean(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    total = values.new_zeros(size, values.shape[-1]).index_add_(0, index, values)
    count = values.new_zeros(size).index_add_(0, index, values.new_ones(index.shape[0]))
    return total / count.clamp(min=1).unsqueeze(-1)


class SteerableBlock(nn.Module):
    def __init__(self, irreps: o3.Irreps, sh: o3.Irreps, edge_scalars: int, hidden: int):
        super().__init__()
        from e3nn.nn import Gate  # noqa: PLC0415  (equirelax.core._e3nn has imported e3nn safely)

        self.message = o3.FullyConnectedTensorProduct(irreps, sh, irreps, shared_weights=False)
        self.message_weights = nn.Sequential(nn.Linear(edge_scalars, hidden), nn.SiLU(),
                                             nn.Linear(hidden, self.message.weight_numel))
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps if ir.l > 0])
        self.gate = Gate(scalars, [nn.functional.silu], f"{gated.num_irreps}x0e", [torch.sigmoid], gated)
        self.update = o3.Linear(irreps + irreps, self.gate.irreps_in)

    def forward(self, features, sh, edge_scalars, edge_index):
        source, target = edge_index
        messages = self.message(features[source], sh, self.message_weights(edge_scalars))
        aggregated = _scatter_mean(messages, target, features.shape[0])
        return features + self.gate(self.update(torch.cat([features, aggregated], dim=-1)))


class SteerableNBody(nn.Module):
    """Positions ``horizon`` steps ahead from ``(h, x, v, edge_index, edge_attr)``, ``h = (|v|, q)``."""

    def __init__(self, hidden_irreps: str = "32x0e + 16x1o", layers: int = 3, lmax: int = 1, node_scalars: int = 2,
                 edge_dim: int = 1, hidden: int = 32, field=None):
        """``field``: a uniform external field (3-vector) given to every node as a second vector input, the
        explicit field-input baseline: equivariant when the field rotates with the system, and with the field
        fixed, symmetric about its axis only."""
        super().__init__()
        irreps = o3.Irreps(hidden_irreps)
        if any(ir.l == 0 and ir.p != 1 for _, ir in irreps) or not any(ir.l == 0 for _, ir in irreps):
            raise ValueError(f"equirelax: hidden_irreps need even scalars (0e) for the gates, got {hidden_irreps!r}")
        self.sh_irreps = o3.Irreps.spherical_harmonics(lmax)
        vectors = 1 if field is None else 2
        self.embedding = o3.Linear(o3.Irreps(f"{node_scalars}x0e + {vectors}x1o"), irreps)
        self.register_buffer("field", None if field is None else torch.as_tensor(
            field, dtype=torch.get_default_dtype()).clone())  # a copy: the user's tensor is not the model's
        self.blocks = nn.ModuleList(SteerableBlock(irreps, self.sh_irreps, 1 + edge_dim, hidden)
                                    for _ in range(layers))
        self.output = o3.Linear(irreps, o3.Irreps("1x1o"))
        with torch.no_grad():
            self.output.weight.mul_(0.1)   # start close to x ← x (EGNN's coordinate MLP does the same)

    def forward(self, h, x, v, edge_index, edge_attr):
        source, target = edge_index
        relative = x[target] - x[source]
        sh = o3.spherical_harmonics(self.sh_irreps, relative, normalize=True, normalization="component")
        # |x_i − x_j| rather than its square: no box, so particles drift far apart and squares grow large
        edge_scalars = torch.cat([relative.norm(dim=-1, keepdim=True), edge_attr], dim=-1)
        inputs = [h, v] if self.field is None else [h, v, self.field.to(v.dtype).expand_as(v)]
        features = self.embedding(torch.cat(inputs, dim=-1))
        for block in self.blocks:
            features = block(features, sh, edge_scalars, edge_index)
        return x + self.output(features)
