"""The charged N-body generator: deterministic, E(3)-equivariant without a field, only rotations about the field
axis with one, and energy-conserving."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from equirelax.datasets.nbody import charged_nbody, simulate

FIELD = np.array([0.0, 0.0, 0.5])


@pytest.fixture(scope="module")
def start():
    data = charged_nbody(16, seed=3, start=0, horizon=1)
    return data.positions, data.velocities, data.charges


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (charged_nbody(4, seed=s, start=50, horizon=50) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert not np.allclose(a.targets, c.targets)
    assert set(np.unique(a.charges)) <= {-1.0, 1.0}


def test_rotations_and_translations_commute_with_the_dynamics(start):
    x, v, q = start
    R = Rotation.random(random_state=0).as_matrix()
    shift = np.array([0.3, -1.2, 2.0])
    reference, _ = simulate(x, v, q, 300)
    rotated, _ = simulate(x @ R.T, v @ R.T, q, 300)
    shifted, _ = simulate(x + shift, v, q, 300)
    assert np.abs(rotated - reference @ R.T).max() < 1e-9
    assert np.abs(shifted - (reference + shift)).max() < 1e-9
    assert np.abs(reference - x).max() > 0.05  # the particles moved


def test_a_field_leaves_only_rotations_about_its_axis(start):
    x, v, q = start
    about_field = Rotation.from_rotvec(0.7 * FIELD / np.linalg.norm(FIELD)).as_matrix()
    other = Rotation.from_rotvec([0.7, 0.0, 0.0]).as_matrix()
    reference, _ = simulate(x, v, q, 300, field=FIELD)
    for R, equivariant in ((about_field, True), (other, False)):
        rotated, _ = simulate(x @ R.T, v @ R.T, q, 300, field=FIELD)
        error = np.abs(rotated - reference @ R.T).max()
        assert (error < 1e-9) if equivariant else (error > 1e-3), error


def test_leapfrog_keeps_the_energy(start):
    x, v, q = start

    def energy(x, v):
        diff = x[:, :, None] - x[:, None, :]
        r = np.linalg.norm(diff, axis=-1) + np.eye(x.shape[1])
        pair = q * np.swapaxes(q, 1, 2) / r * (1 - np.eye(x.shape[1]))
        return 0.5 * (v**2).sum(axis=(1, 2)) + 0.5 * pair.sum(axis=(1, 2))

    x1, v1 = simulate(x, v, q, 1000, max_force=np.inf)
    drift = np.abs(energy(x1, v1) - energy(x, v)) / np.abs(energy(x, v)).clip(min=0.1)
    assert np.median(drift) < 1e-4


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least 2 particles"):
        charged_nbody(3, n_particles=1)
    with pytest.raises(ValueError, match="horizon >= 1"):
        charged_nbody(3, horizon=0)
