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


# ------------------------------------------------------------------ the EGNN authors' data, exactly
def _authors_sample_trajectory(n=5, T=5000, sample_freq=100):
    """A literal transcription of the authors' ``ChargedParticlesSim.sample_trajectory`` (3D, no box, noise 0),
    one system at a time from the global legacy ``np.random`` stream, as their ``generate_dataset.py`` runs it."""
    def l2(A, B):
        return (A**2).sum(axis=1).reshape(-1, 1) + (B**2).sum(axis=1).reshape(1, -1) - 2 * A.dot(B.T)

    T_save = T // sample_freq - 1
    charges = np.random.choice(np.array([-1.0, 0.0, 1.0]), size=(n, 1), p=[0.5, 0, 0.5])
    edges = charges.dot(charges.T)
    loc, vel = np.zeros((T_save, 3, n)), np.zeros((T_save, 3, n))
    loc_next = np.random.randn(3, n)
    vel_next = np.random.randn(3, n)
    vel_next = vel_next * 0.5 / np.sqrt((vel_next**2).sum(axis=0)).reshape(1, -1)

    def force(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            size = edges / np.power(l2(x.T, x.T), 1.5)
        np.fill_diagonal(size, 0)
        F = (size.reshape(1, n, n) * np.stack([np.subtract.outer(x[d], x[d]) for d in range(3)])).sum(axis=-1)
        F[F > 100.0] = 100.0
        F[F < -100.0] = -100.0
        return F

    counter = 0
    vel_next = vel_next + 0.001 * force(loc_next)
    for i in range(1, 4101):  # the authors run to T; frames past 40 are not used
        loc_next = loc_next + 0.001 * vel_next
        if i % sample_freq == 0:
            loc[counter], vel[counter] = loc_next, vel_next
            counter += 1
        vel_next = vel_next + 0.001 * force(loc_next)
    np.random.randn(T_save, 3, n)
    np.random.randn(T_save, 3, n)
    return loc, vel, charges


def test_egnn_reference_data_is_the_authors_generator():
    from equirelax.datasets.nbody import egnn_reference_nbody

    state = np.random.get_state()
    try:
        np.random.seed(43)
        reference = [_authors_sample_trajectory() for _ in range(5)]  # 3 train, then 2 valid
    finally:
        np.random.set_state(state)
    data = egnn_reference_nbody(3, 2, 0, max_samples=None)
    for split, indices in (("train", range(3)), ("valid", range(3, 5))):
        for row, k in enumerate(indices):
            loc, vel, charges = reference[k]
            assert np.array_equal(data[split].charges[row], charges)
            # bit for bit: any rounding difference grows through the chaotic dynamics (einsum instead of the
            # authors' dot products left 4e-9 by frame 30)
            assert np.array_equal(data[split].positions[row], loc[30].T)  # frame 30, step 3100
            assert np.array_equal(data[split].velocities[row], vel[30].T)
            assert np.array_equal(data[split].targets[row], loc[40].T)  # frame 40, step 4100
    assert "test" not in data


def test_egnn_reference_velocities_lag_half_a_step_and_clipping_is_per_component():
    from equirelax.datasets.nbody import _egnn_forces

    x = np.array([[[0.0, 0.0, 0.0], [0.05, 0.02, 0.0]]])  # close enough for forces past the ±100 clip
    q = np.array([[[1.0], [1.0]]])
    clipped = _egnn_forces(x, q, None)
    assert np.abs(clipped).max() == 100.0
    direction = clipped[0, 0] / np.linalg.norm(clipped[0, 0])
    assert not np.allclose(direction, -x[0, 1] / np.linalg.norm(x[0, 1]))  # the clip turned the force
