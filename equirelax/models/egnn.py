"""EGNN (Satorras, Hoogeboom, Welling 2021) written with torch-geometric's ``MessagePassing``.

No maintained package ships the paper's model, so this is a faithful one: the
velocity variant used for N-body systems (``E_GCL_vel`` of the reference code,
mean coordinate aggregation, residual node update)::

    m_ij = φ_e(h_i, h_j, |x_i − x_j|², a_ij)
    x_i ← x_i + mean_j (x_i − x_j) φ_x(m_ij) + φ_v(h_i) v_i
    h_i ← h_i + φ_h(h_i, Σ_j m_ij)

The relaxable layer of each block is its coordinate update (``CoordinateUpdate``):
the branch reads the node features h and the *raw* coordinates and velocities
(as the CR/ACE N-body code does), which breaks rotations and translations, and
adds γ·f_neq(h, x, v) to the update. EGNN's update has no weights a projected
branch could be folded into, so export drops the branches (γ := 0): the plain
EGNN again, E(3)-equivariant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from ..datasets.nbody import nbody_graph  # noqa: F401  (the model's inputs; kept importable from here)


def _mlp(dim_in: int, hidden: int, dim_out: int, last_activation: bool = False) -> nn.Sequential:
    layers = [nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, dim_out)]
    if last_activation:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class CoordinateUpdate(nn.Module):
    """Δx_i = mean_j (x_i − x_j) φ_x(m_ij) + φ_v(h_i) v_i: the equivariant coordinate update of one block."""

    def __init__(self, hidden: int):
        super().__init__()
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # as the reference code: start near the identity map
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.velocity_mlp = _mlp(hidden, hidden, 1)
        self.hidden = hidden

    def forward(self, h, x, v, messages, edge_index):
        source, target = edge_index
        trans = (x[target] - x[source]) * self.coord_mlp(messages)
        delta = scatter(trans, target, dim=0, dim_size=x.shape[0], reduce="mean")
        return delta + self.velocity_mlp(h) * v


class EGCL(MessagePassing):
    """One E(n)-equivariant graph convolution block with velocities."""

    def __init__(self, hidden: int, edge_dim: int = 1):
        super().__init__(aggr="add")
        self.edge_mlp = _mlp(2 * hidden + 1 + edge_dim, hidden, hidden, last_activation=True)
        self.node_mlp = _mlp(2 * hidden, hidden, hidden)
        self.coordinate_update = CoordinateUpdate(hidden)

    def message(self, h_i, h_j, x_i, x_j, edge_attr):
        squared = (x_i - x_j).pow(2).sum(-1, keepdim=True)
        return self.edge_mlp(torch.cat([h_i, h_j, squared, edge_attr], dim=-1))

    def forward(self, h, x, v, edge_index, edge_attr):
        source, target = edge_index
        messages = self.message(h[target], h[source], x[target], x[source], edge_attr)
        x = x + self.coordinate_update(h, x, v, messages, edge_index)
        aggregated = self.aggregate(messages, target, dim_size=h.shape[0])
        h = h + self.node_mlp(torch.cat([h, aggregated], dim=-1))
        return h, x


class EGNN(nn.Module):
    """EGNN for N-body prediction: node features in, updated coordinates out."""

    def __init__(self, node_dim: int = 1, edge_dim: int = 1, hidden: int = 64, layers: int = 4):
        super().__init__()
        self.embedding = nn.Linear(node_dim, hidden)
        self.blocks = nn.ModuleList(EGCL(hidden, edge_dim) for _ in range(layers))

    def forward(self, h, x, v, edge_index, edge_attr):
        h = self.embedding(h)
        for block in self.blocks:
            h, x = block(h, x, v, edge_index, edge_attr)
        return x
