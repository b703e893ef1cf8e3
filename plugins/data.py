"""Generated atomistic data (no downloads): ASE EMT energies and forces, optionally in a uniform field.

Configurations are rattled Cu/Al fcc cells, randomly rotated (a rotation-invariant
distribution), with EMT energies and forces. ``field`` adds a uniform external
electric field acting on fixed per-species charges (Cu +q, Al −q):
E_field = −Σ q_i F·r_i and f_i += q_i F, which leaves only rotations about F.
Written as extxyz with ``REF_energy`` / ``REF_forces``, which MACE and NequIP read.
"""

from __future__ import annotations

import numpy as np

CHARGES = {29: 1.0, 13: -1.0}


def emt_configurations(n: int, *, seed: int = 0, field=None, size=(2, 1, 1), rattle=(0.02, 0.15)):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    field = None if field is None else np.asarray(field, dtype=float)
    configs = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * size
        atoms.numbers[rng.random(len(atoms)) < 0.3] = 13
        atoms.positions += rng.normal(scale=rng.uniform(*rattle), size=atoms.positions.shape)
        rotation = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
        atoms.set_cell(np.array(atoms.cell) @ rotation.T, scale_atoms=True)
        atoms.calc = EMT()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        if field is not None:
            q = np.array([CHARGES[z] for z in atoms.numbers])
            energy = energy - float(np.sum(q * (atoms.positions @ field)))
            forces = forces + q[:, None] * field[None, :]
        atoms.calc = None
        atoms.info["REF_energy"] = energy
        atoms.arrays["REF_forces"] = forces
        configs.append(atoms)
    return configs


def write_emt_dataset(path, n: int, *, seed: int = 0, field=None, **kwargs):
    from ase.io import write

    write(str(path), emt_configurations(n, seed=seed, field=field, **kwargs), format="extxyz")
    return path
