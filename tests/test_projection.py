"""P is the orthogonal Haar projector onto equivariant maps: property tests over random irreps."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equirelax.core._e3nn import o3
from equirelax.core.irreps import random_rotations, wigner_D
from equirelax.core.projection import HaarProjector, mc_project

irrep = st.tuples(st.integers(1, 3), st.integers(0, 3), st.sampled_from(["e", "o"]))
irreps_strategy = st.lists(irrep, min_size=1, max_size=4).map(
    lambda items: o3.Irreps("+".join(f"{mul}x{l}{p}" for mul, l, p in items))
)
SETTINGS = settings(max_examples=40, deadline=None)


def _random(projector, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*projector.shape, generator=g, dtype=torch.float64)


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.sampled_from(["O3", "SO3"]), st.integers(0, 10**6))
def test_projection_is_idempotent_and_orthogonal(irreps_in, irreps_out, group, seed):
    P = HaarProjector(irreps_in, irreps_out, group)
    W, V = _random(P, seed), _random(P, seed + 1)
    PW = P(W)
    assert torch.allclose(P(PW), PW, atol=1e-12)
    # W - P(W) is orthogonal to every projected (equivariant) map
    assert abs(float(((W - PW) * P(V)).sum())) < 1e-10
    # self-adjoint: <P W, V> = <W, P V>
    assert abs(float((PW * V).sum() - (W * P(V)).sum())) < 1e-10


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.sampled_from(["O3", "SO3"]), st.integers(1, 4), st.integers(0, 10**6))
def test_low_rank_projection_applies_the_dense_projection(irreps_in, irreps_out, group, rank, seed):
    P = HaarProjector(irreps_in, irreps_out, group)
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(P.shape[0], rank, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(rank, P.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, P.shape[1], generator=g, dtype=torch.float64)
    fast = P.apply_coefficients([P.lowrank_coefficients(B, A)], x.reshape(-1, P.shape[1]))
    fast, dense = fast[0].reshape(3, 5, -1), x @ P(B @ A).T
    assert torch.allclose(fast, dense, atol=1e-12)
    if not P.blocks:  # no irrep on both sides: P is zero, with no gradient
        return
    fast_grads = torch.autograd.grad(fast.pow(2).sum(), (B, A))
    dense_grads = torch.autograd.grad(dense.pow(2).sum(), (B, A))
    assert all(torch.allclose(f, d, atol=1e-10) for f, d in zip(fast_grads, dense_grads))


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.sampled_from(["O3", "SO3"]), st.integers(1, 3), st.integers(0, 10**6))
def test_projection_through_the_rank_applies_the_dense_projection(irreps_in, irreps_out, group, rank, seed):
    """``apply_lowrank`` (RECM's probe maps on large layers), for irreps laid out in runs of columns (slices)
    and not (gathers)."""
    P = HaarProjector(irreps_in, irreps_out, group)
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(2, P.shape[0], rank, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, rank, P.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, P.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    fast = P.apply_lowrank(B, A, x)
    dense = torch.stack([x @ P(B[k] @ A[k]).T for k in (0, 1)])
    assert torch.allclose(fast, dense, atol=1e-12)
    if not P.blocks:
        return
    fast_grads = torch.autograd.grad(fast.pow(2).sum(), (B, A, x))
    dense_grads = torch.autograd.grad(dense.pow(2).sum(), (B, A, x))
    assert all(torch.allclose(f, d, atol=1e-10) for f, d in zip(fast_grads, dense_grads))


def test_blocks_are_slices_where_the_irreps_are_runs_of_columns():
    assert HaarProjector("4x0e+2x1o", "3x0e+1x2e+2x1o").slices == [(0, 0), (8, 4)]
    assert HaarProjector("4x0e+2x1o+1x0e", "3x0e").slices is None  # 0e in two runs: gathered
    assert HaarProjector("2x1o+1x0e+2x1e", "1x1o", "SO3").slices is None  # one SO(3) type over two runs


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.sampled_from(["O3", "SO3"]), st.integers(0, 10**6))
def test_projected_map_commutes_with_wigner_matrices(irreps_in, irreps_out, group, seed):
    P = HaarProjector(irreps_in, irreps_out, group)
    PW = P(_random(P, seed))
    for R in random_rotations(3, group, generator=torch.Generator().manual_seed(seed)):
        D_in, D_out = wigner_D(irreps_in, R), wigner_D(irreps_out, R)
        assert (D_out @ PW - PW @ D_in).abs().max() < 1e-12


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.integers(0, 10**6))
def test_random_map_does_not_commute(irreps_in, irreps_out, seed):
    P = HaarProjector(irreps_in, irreps_out, "O3")
    W = _random(P, seed)
    residual = W - P(W)
    R = random_rotations(1, "SO3", generator=torch.Generator().manual_seed(seed))[0]
    if residual.abs().max() > 1e-8:
        # a rotation, or the same rotation with inversion (parity-only violations show only there)
        violations = [
            (wigner_D(irreps_out, g) @ W - W @ wigner_D(irreps_in, g)).abs().max() for g in (R, -R)
        ]
        assert max(violations) > 1e-8


@SETTINGS
@given(irreps_strategy, irreps_strategy, st.integers(0, 10**6))
def test_e3nn_linear_maps_are_fixed_points(irreps_in, irreps_out, seed):
    torch.manual_seed(seed)
    linear = o3.Linear(irreps_in, irreps_out).to(torch.float64)
    M = linear(torch.eye(irreps_in.dim, dtype=torch.float64)).T.detach()
    assert torch.allclose(HaarProjector(irreps_in, irreps_out, "O3")(M), M, atol=1e-12)


def test_so3_projection_keeps_maps_between_opposite_parities():
    W = torch.randn(3, 3, dtype=torch.float64)
    assert HaarProjector("1o", "1e", "O3")(W).abs().max() == 0
    assert torch.allclose(HaarProjector("1o", "1e", "SO3")(W), torch.eye(3, dtype=torch.float64) * W.trace() / 3)


def test_projection_matches_haar_average():
    """The closed form equals ∫ ρ_out(g)^T W ρ_in(g) dg, estimated by Monte Carlo."""
    irreps_in, irreps_out = o3.Irreps("2x0e+1x1o+1x2e"), o3.Irreps("1x0e+2x1o+1x2e")
    W = torch.randn(irreps_out.dim, irreps_in.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, irreps_in.dim, dtype=torch.float64)
    value, stderr = mc_project(lambda v: v @ W.T, x, irreps_in, irreps_out, n_samples=4000,
                               generator=torch.Generator().manual_seed(0))
    exact = x @ HaarProjector(irreps_in, irreps_out)(W).T
    assert (value - exact).abs().max() < 6 * stderr.max() + 1e-12
    assert stderr.max() < 0.1


def test_projection_is_differentiable_and_batched():
    P = HaarProjector("2x0e+1x1o", "1x0e+1x1o")
    W = torch.randn(4, *P.shape, dtype=torch.float64, requires_grad=True)
    P(W).sum().backward()
    assert torch.allclose(P(W)[2], P(W[2]))
    assert W.grad is not None and W.grad.abs().sum() > 0
