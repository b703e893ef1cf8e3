"""equivariance_error: zero for e3nn models, positive for relaxed ones, per layer, invariant and vector outputs."""

import pytest
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


def _one_step(model, handle, x, y):
    opt = handle.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def test_breaking_measures_the_non_equivariant_output_not_gamma(model):
    from equirelax.datasets.synthetic import make_task

    x, y = make_task("field", 64)
    handle = equirelax.relax(model, "fixed", branch="linear", init="random", init_std=0.3)
    assert handle.breaking() == {}  # nothing measured before a training step
    _one_step(model, handle, x, y)
    first = handle.breaking()
    layer = handle.layers["0"]
    # by hand: ‖γ (W − P(W)) x‖ / ‖f_eq(x)‖ on the step's rows
    W = layer.branch.weight.detach()
    off = x @ (W - layer.projector(W)).T
    with torch.no_grad():
        base = layer.base(x)
    assert first["0"] == pytest.approx(float(off.norm() / base.norm()), rel=1e-10)
    # γ halved, W doubled: the same function, the same level (γ alone would have halved)
    with torch.no_grad():
        layer.gamma.mul_(0.5)
        layer.branch.weight.mul_(2.0)
    _one_step(model, handle, x, y)
    assert handle.breaking()["0"] == pytest.approx(first["0"], rel=1e-10)
    # an equivariant branch breaks nothing, whatever γ is
    with torch.no_grad():
        layer.branch.weight.copy_(layer.projector(layer.branch.weight))
    _one_step(model, handle, x, y)
    assert handle.breaking()["0"] < 1e-12 and handle.metrics()["breaking/0"] < 1e-12


def test_breaking_of_an_mlp_branch_counts_all_of_it(model):
    from equirelax.datasets.synthetic import make_task

    x, y = make_task("field", 64)
    handle = equirelax.relax(model, "fixed", branch="mlp", init="random", init_std=0.3, gamma=0.5)
    _one_step(model, handle, x, y)
    layer = handle.layers["0"]
    with torch.no_grad():
        expected = float((0.5 * layer.branch(x)).norm() / layer.base(x).norm())
    assert handle.breaking()["0"] == pytest.approx(expected, rel=1e-10)
