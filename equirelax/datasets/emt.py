"""Generated atomistic data (no downloads): ASE EMT energies and forces, optionally in a uniform field.

Configurations are isolated, rattled Cu/Al clusters cut from fcc, randomly
rotated (a rotation-invariant distribution), with EMT energies and forces.
``field`` adds a uniform external electric field F acting on fixed per-species
charges (Cu +q, Al −q), neutralised per configuration (Σq = 0) so the field
exerts no net force: E += −Σ q_i F·r_i and f_i += q_i F. The result is still
translation invariant but keeps only the rotations about F. Clusters, not
periodic cells: a uniform-field energy is not defined in a periodic cell.
Written as extxyz with ``REF_energy`` / ``REF_forces``, which MACE and NequIP read, and the field as info
``external_field`` (MACE's name for it), which only a model given the field reads.
"""

from __future__ import annotations

import numpy as np

CHARGES = {29: 1.0, 13: -1.0}


def _cluster(rng, n_atoms: int):
    from ase.build import bulk

    crystal = bulk("Cu", "fcc", a=3.6, cubic=True) * (4, 4, 4)
    centre = crystal.positions.mean(axis=0) + rng.normal(scale=0.3, size=3)
    order = np.argsort(np.linalg.norm(crystal.positions - centre, axis=1))
    atoms = crystal[order[:n_atoms]]
    atoms.set_cell([0.0, 0.0, 0.0])
    atoms.pbc = False
    atoms.positions -= atoms.positions.mean(axis=0)
    return atoms


def emt_configurations(n: int, *, seed: int = 0, field=None, n_atoms=(8, 13), rattle=(0.03, 0.15),
                       aluminium_fraction: float = 0.35):
    from ase.calculators.emt import EMT
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    field = None if field is None else np.asarray(field, dtype=float)
    configs = []
    for _ in range(n):
        atoms = _cluster(rng, int(rng.integers(n_atoms[0], n_atoms[1] + 1)))
        atoms.numbers[rng.random(len(atoms)) < aluminium_fraction] = 13
        atoms.positions += rng.normal(scale=rng.uniform(*rattle), size=atoms.positions.shape)
        atoms.positions = atoms.positions @ Rotation.random(random_state=rng.integers(2**31)).as_matrix().T
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        if field is not None:
            q = np.array([CHARGES[z] for z in atoms.numbers], dtype=float)
            q -= q.mean()
            energy = energy - float(np.sum(q * (atoms.positions @ field)))
            forces = forces + q[:, None] * field[None, :]
        atoms.calc = None
        atoms.info["REF_energy"] = energy
        if field is not None:  # MACE's name for it (PolarMACE, MACECalculator): what a field-input model reads
            atoms.info["external_field"] = field.copy()
        atoms.arrays["REF_forces"] = forces
        configs.append(atoms)
    return configs


def write_emt_dataset(path, n: int, *, seed: int = 0, field=None, **kwargs):
    from ase.io import write

    write(str(path), emt_configurations(n, seed=seed, field=field, **kwargs), format="extxyz")
    return path
