"""Charged-particle N-body systems (after Kipf et al. 2018, as used by EGNN, SEGNN, CR and ACE), optionally in a
uniform external field. Deterministic by seed; no downloads.

Each system has ``n_particles`` point charges q = ±1 (uniform at random) with
Gaussian initial positions (std ``loc_std``) and random initial velocities of
norm ``vel_norm``. Pairwise Coulomb-like forces F_i = Σ_j q_i q_j (x_i − x_j) /
|x_i − x_j|³ (like charges repel; each pair's force clipped at ``max_force``)
are integrated with leapfrog steps of ``dt``. No box walls, so the dynamics is
E(3)-equivariant. ``field`` adds the uniform force q_i·F to every particle: only
rotations about F (and translations) remain symmetries.

The task: from positions and velocities at step ``start`` predict positions
``horizon`` steps later (1000 in the papers: frames 30 → 40 at a sampling
interval of 100 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NBodyData:
    positions: np.ndarray   # [systems, particles, 3] at the input step
    velocities: np.ndarray  # [systems, particles, 3] at the input step
    charges: np.ndarray     # [systems, particles, 1]
    targets: np.ndarray     # [systems, particles, 3] positions `horizon` steps later

    def __len__(self):
        return len(self.positions)

    def tensors(self, dtype=None):
        import torch

        dtype = dtype or torch.get_default_dtype()
        return tuple(torch.as_tensor(a, dtype=dtype) for a in (self.positions, self.velocities, self.charges,
                                                                 self.targets))


def _forces(positions, charges, field, max_force):
    n = positions.shape[1]
    diff = positions[:, :, None, :] - positions[:, None, :, :]          # x_i - x_j
    distance = np.linalg.norm(diff, axis=-1) + np.eye(n)               # i = j carries no force; no 0/0
    strength = charges * np.swapaxes(charges, 1, 2) * (1.0 - np.eye(n)) / distance**3   # q_i q_j / r³
    pair = strength[..., None] * diff
    # each pair's force clipped by its norm (not per component, which would break rotation equivariance)
    norm = np.linalg.norm(pair, axis=-1, keepdims=True)
    pair = pair * np.minimum(1.0, max_force / np.maximum(norm, 1e-300))
    forces = pair.sum(axis=2)
    if field is not None:
        forces = forces + charges * np.asarray(field, dtype=float)[None, None, :]
    return forces


def simulate(positions, velocities, charges, steps: int, *, dt: float = 1e-3, field=None, max_force: float = 100.0):
    """``(positions, velocities)`` after ``steps`` leapfrog (kick-drift-kick) steps; arrays ``[systems, n, 3]``."""
    positions, velocities = np.array(positions, dtype=float), np.array(velocities, dtype=float)
    forces = _forces(positions, charges, field, max_force)
    for _ in range(steps):
        velocities = velocities + 0.5 * dt * forces
        positions = positions + dt * velocities
        forces = _forces(positions, charges, field, max_force)
        velocities = velocities + 0.5 * dt * forces
    return positions, velocities


def charged_nbody(n_systems: int, *, seed: int = 0, field=None, n_particles: int = 5, start: int = 3000,
                  horizon: int = 1000, dt: float = 1e-3, loc_std: float = 1.0, vel_norm: float = 0.5,
                  max_force: float = 100.0) -> NBodyData:
    """``n_systems`` systems simulated for ``start + horizon`` steps (all at once, vectorised)."""
    if n_systems < 1 or n_particles < 2:
        raise ValueError("equirelax: charged_nbody needs at least 1 system of at least 2 particles")
    if start < 0 or horizon < 1:
        raise ValueError(f"equirelax: charged_nbody needs start >= 0 and horizon >= 1, got {start}, {horizon}")
    rng = np.random.default_rng(seed)
    charges = rng.choice([-1.0, 1.0], size=(n_systems, n_particles, 1))
    positions = rng.normal(scale=loc_std, size=(n_systems, n_particles, 3))
    velocities = rng.normal(size=(n_systems, n_particles, 3))
    velocities *= vel_norm / np.linalg.norm(velocities, axis=-1, keepdims=True)
    settings = {"dt": dt, "field": field, "max_force": max_force}
    positions, velocities = simulate(positions, velocities, charges, start, **settings)
    targets, _ = simulate(positions, velocities, charges, horizon, **settings)
    return NBodyData(positions, velocities, charges, targets)


def nbody_graph(positions, velocities, charges, node_charges: bool = False):
    """Batched fully connected graphs from ``[systems, n, 3]`` arrays/tensors: the EGNN N-body inputs
    ``(h, x, v, edge_index, edge_attr)`` with h = |v| (``node_charges``: h = (|v|, q)) and a_ij = q_i q_j."""
    import torch  # noqa: PLC0415  (the generator itself needs numpy only)

    positions, velocities, charges = (torch.as_tensor(a, dtype=torch.get_default_dtype())
                                      for a in (positions, velocities, charges))
    systems, n, _ = positions.shape
    pairs = torch.tensor([(i, j) for i in range(n) for j in range(n) if i != j]).T        # [2, n(n-1)]
    offsets = (torch.arange(systems) * n).repeat_interleave(pairs.shape[1])
    edge_index = pairs.repeat(1, systems) + offsets
    q = charges.reshape(-1, 1)
    edge_attr = q[edge_index[0]] * q[edge_index[1]]
    v = velocities.reshape(-1, 3)
    h = v.norm(dim=-1, keepdim=True)
    if node_charges:
        h = torch.cat([h, q], dim=-1)
    return h, positions.reshape(-1, 3), v, edge_index, edge_attr
