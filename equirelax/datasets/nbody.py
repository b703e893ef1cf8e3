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


def egnn_reference_nbody(num_train: int = 10000, num_valid: int = 2000, num_test: int = 2000, *, seed: int = 43,
                         max_samples: int | None = 3000, field=None, n_particles: int = 5, length: int = 5000,
                         sample_freq: int = 100, frames=(30, 40)) -> dict:
    """The charged N-body data as the EGNN authors generate it (``n_body_system/dataset/generate_dataset.py``,
    ``--num-train 10000 --seed 43 --sufix small``; Kipf et al.'s ``ChargedParticlesSim`` without boxes), exactly:

    - one legacy ``np.random`` stream for train, then valid, then test, drawing per system the charges
      (``choice([-1, 0, 1], p=[½, 0, ½])``), positions and velocities as ``[3, n]`` arrays, and the
      observation noise arrays (noise 0, drawn all the same);
    - forces Σ_j q_i q_j (x_i − x_j)/|x_i − x_j|³ with each Cartesian component of a particle's *total*
      force clipped at ±100 (this depends on the axes, so the data is slightly not rotation-symmetric);
    - a full first kick, then drift/kick steps of dt = 0.001, so the stored velocities are half a step
      behind the positions; frame k is step 100·(k + 1): input frame 30 (step 3100), target frame 40 (4100).

    ``field`` (not in the authors' data) adds q_i·F to each total force before the clipping. Returns
    ``{"train": NBodyData, "valid": ..., "test": ...}`` with the first ``max_samples`` systems of each split
    simulated (EGNN trains on the first 3000). :func:`charged_nbody` is the exactly symmetric stand-in.
    """
    if length % sample_freq:
        raise ValueError(f"equirelax: length {length} is not a multiple of sample_freq {sample_freq}")
    saved = length // sample_freq - 1
    first, last = frames
    if not 0 <= first < last < saved:
        raise ValueError(f"equirelax: frames {frames} must be increasing and below {saved}")
    rng = np.random.RandomState(seed)
    splits = {}
    for name, count in (("train", num_train), ("valid", num_valid), ("test", num_test)):
        draws = []
        for _ in range(count):
            charges = rng.choice(np.array([-1.0, 0.0, 1.0]), size=(n_particles, 1), p=[0.5, 0.0, 0.5])
            loc = rng.randn(3, n_particles) * 1.0
            vel = rng.randn(3, n_particles)
            vel = vel * 0.5 / np.sqrt((vel**2).sum(axis=0)).reshape(1, -1)
            rng.randn(saved, 3, n_particles)  # the observation noise (variance 0) of positions and velocities
            rng.randn(saved, 3, n_particles)
            draws.append((charges, loc.T, vel.T))
        keep = draws[: count if max_samples is None else min(count, max_samples)]
        if not keep:
            continue
        charges, loc, vel = (np.stack(a) for a in zip(*keep))
        inputs, targets = _egnn_trajectory(loc, vel, charges, field, sample_freq, (first, last))
        splits[name] = NBodyData(inputs[0], inputs[1], charges, targets)
    return splits


def _egnn_forces(loc, charges, field):
    n = loc.shape[1]
    # the authors' squared distance, |x_i|² + |x_j|² − 2 x_i·x_j (not Σ(x_i − x_j)²: the last bits differ)
    norms = (loc**2).sum(axis=-1)
    dist2 = norms[:, :, None] + norms[:, None, :] - 2 * np.matmul(loc, np.swapaxes(loc, 1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        size = (charges * np.swapaxes(charges, 1, 2)) / np.power(dist2, 1.5)
    size[:, np.arange(n), np.arange(n)] = 0.0
    forces = (size[..., None] * (loc[:, :, None, :] - loc[:, None, :, :])).sum(axis=2)
    if field is not None:
        forces = forces + charges * np.asarray(field, dtype=float)
    return np.clip(forces, -100.0, 100.0)  # per Cartesian component of the total force, as the authors do


def _egnn_trajectory(loc, vel, charges, field, sample_freq, frames):
    """``((positions, velocities) at frames[0], positions at frames[1])`` of the authors' integration."""
    loc, vel = loc.copy(), vel.copy()
    dt = 0.001
    vel = vel + dt * _egnn_forces(loc, charges, field)
    wanted = {sample_freq * (k + 1): k for k in frames}
    out = {}
    for step in range(1, max(wanted) + 1):
        loc = loc + dt * vel
        if step in wanted:
            out[wanted[step]] = (loc.copy(), vel.copy())
        vel = vel + dt * _egnn_forces(loc, charges, field)
    return out[frames[0]], out[frames[1]][0]
