"""equivariance_error: zero for e3nn models, positive for relaxed ones, per layer, invariant and vector outputs."""

import torch

import equirelax
from equirelax.core._e3nn import o3


def test_equivariant_model_has_float_floor_error(model):
    x = torch.randn(50, model.irreps_in.dim)
    error = equirelax.equivariance_error(model, x)
    assert error.mean < 1e-12 and error.max < 1e-12
    assert error.layers == {}


def test_relaxed_model_error_is_positive_and_per_layer(model):
    x = torch.randn(50, model.irreps_in.dim)
    handle = equirelax.relax(model, "fixed", init="random", init_std=0.3)
    error = equirelax.equivariance_error(model, x, n_rotations=3)
    assert error.mean > 1e-3 and error.max >= error.mean
    assert set(error.layers) == set(handle.layers) == {"0", "2"}
    assert all(v["mean"] > 1e-3 for v in error.layers.values())
    with handle.projected():
        assert equirelax.equivariance_error(model, x).max < 1e-10


def test_invariant_and_vector_outputs():
    scalar = o3.Linear("2x0e+1x1o", "1x0e")
    vector = o3.Linear("2x0e+1x1o", "1x1o")
    x = torch.randn(20, 5)
    assert equirelax.equivariance_error(scalar, x).max < 1e-12
    assert equirelax.equivariance_error(vector, x).max < 1e-12
    # a "vector" that does not rotate is caught
    broken = torch.nn.Sequential(scalar, torch.nn.Linear(1, 3))
    broken.irreps_in, broken.irreps_out = o3.Irreps("2x0e+1x1o"), o3.Irreps("1x1o")
    assert equirelax.equivariance_error(broken, x).mean > 0.1


def test_parity_is_checked_for_o3_but_not_so3():
    # maps 1o -> 1e: rotation-equivariant, breaks inversion
    model = torch.nn.Sequential(torch.nn.Identity())
    x = torch.randn(10, 3)
    kwargs = dict(irreps_in="1o", irreps_out="1e", n_rotations=8, generator=torch.Generator().manual_seed(1))
    assert equirelax.equivariance_error(model, x, group="SO3", **kwargs).max < 1e-12
    assert equirelax.equivariance_error(model, x, group="O3", **kwargs).max > 1.0
