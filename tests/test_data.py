"""Generated EMT data: deterministic, symmetric without a field, exactly the stated field otherwise."""

import numpy as np
import pytest

pytest.importorskip("ase")

from equirelax.datasets.emt import CHARGES, emt_configurations  # noqa: E402


def test_deterministic_by_seed_and_field_is_the_stated_term():
    a = emt_configurations(3, seed=5)
    b = emt_configurations(3, seed=5)
    field = np.array([0.0, 0.0, 0.4])
    c = emt_configurations(3, seed=5, field=field)
    for x, y, z in zip(a, b, c):
        assert np.array_equal(x.positions, y.positions) and x.info["REF_energy"] == y.info["REF_energy"]
        q = np.array([CHARGES[n] for n in x.numbers], dtype=float)
        q -= q.mean()
        assert np.allclose(z.arrays["REF_forces"] - x.arrays["REF_forces"], q[:, None] * field)
        assert z.info["REF_energy"] - x.info["REF_energy"] == pytest.approx(-float(q @ (x.positions @ field)))
        assert np.allclose(z.arrays["REF_forces"].sum(axis=0), x.arrays["REF_forces"].sum(axis=0))  # no net force
        assert not x.pbc.any()


def test_emt_forces_are_the_energy_gradient():
    from ase.calculators.emt import EMT

    atoms = emt_configurations(1, seed=2)[0]
    atoms.calc = EMT()
    forces = atoms.get_forces()
    h = 1e-5
    atoms.positions[0, 1] += h
    e_plus = atoms.get_potential_energy()
    atoms.positions[0, 1] -= 2 * h
    e_minus = atoms.get_potential_energy()
    assert -(e_plus - e_minus) / (2 * h) == pytest.approx(forces[0, 1], rel=1e-4, abs=1e-6)
