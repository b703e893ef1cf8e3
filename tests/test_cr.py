"""CR: its schedule (on every step of the budget, or at epoch ends), and the Lie-derivative and norm regulariser
with its hand-taken gradients."""

import copy

import pytest
import torch

import equirelax
from equirelax.core.branches import LinearBranch, MLPBranch
from equirelax.core.controllers import cr_schedule, lie_derivative_terms
from equirelax.core.irreps import so3_generators
from equirelax.core.projection import HaarProjector
from equirelax.datasets.synthetic import make_task


def test_cr_schedules():
    assert [cr_schedule("triangular", e, 10) for e in (0, 2, 5, 8, 10, 12)] == pytest.approx([0, 0.4, 1, 0.4, 0, 0])
    assert [cr_schedule("linear", e, 4) for e in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert cr_schedule("constant", 7, None, theta=0.3) == 0.3


def test_cr_levels_follow_the_schedule_and_end_at_zero(model, train_loop):
    x, y = make_task("symmetric", 128)
    handle = equirelax.relax(model, "cr", epochs=4)
    seen = [handle.levels()["0"]]
    for epoch in range(4):
        train_loop(model, handle, x, y, steps=2, seed=epoch)
        handle.epoch_end()
        seen.append(handle.levels()["0"])
    assert seen == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert len(set(handle.levels().values())) == 1  # one global θ


@pytest.mark.parametrize("epochs,steps_per_epoch", [(1, 20), (4, 5)])
def test_cr_theta_follows_the_schedule_on_every_step_of_the_budget(model, train_loop, epochs, steps_per_epoch):
    """With the budget known θ moves every step, so a one-epoch fine-tune relaxes (set only at epoch ends, θ
    stayed 0 all epoch: vanilla training) and its last steps train a model at θ near 0."""
    x, y = make_task("field", 256)
    total = epochs * steps_per_epoch
    handle = equirelax.relax(model, "cr", epochs=epochs, total_steps=total, init="random")
    branch = copy.deepcopy(handle.layers["0"].branch.state_dict())
    seen = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            train_loop(model, handle, x, y, steps=1, seed=len(seen))
            seen.append(handle.levels()["0"])
        handle.epoch_end()
        assert handle.levels()["0"] == seen[-1]  # the epoch's end is where its last step left θ
    expected = [2 * t / total if t <= total / 2 else 2 * (1 - t / total) for t in range(1, total + 1)]
    assert seen == pytest.approx(expected)
    assert max(seen) == pytest.approx(1.0) and seen[-1] == 0.0 and seen[-2] == pytest.approx(2 / total)
    assert handle.metrics()["cr/theta"] == 0.0
    trained = handle.layers["0"].branch.state_dict()
    assert any(not torch.equal(trained[key], value) for key, value in branch.items())  # the branch took part


@pytest.mark.parametrize("options", [{}, {"total_steps": 6, "granularity": "epoch"}])
def test_cr_without_a_budget_or_at_epoch_granularity_moves_theta_at_epoch_ends_only(model, train_loop, options):
    x, y = make_task("field", 128)
    handle = equirelax.relax(model, "cr", epochs=2, **options)
    train_loop(model, handle, x, y, steps=3)
    assert handle.levels()["0"] == 0.0
    handle.epoch_end()
    assert handle.levels()["0"] == 1.0


@pytest.mark.parametrize("irreps_in,irreps_out", [("2x0e+1x1o+1x2e", "1x0e+2x1o+1x2e"), ("3x1o", "1x0e+1x1e")])
def test_lie_derivative_is_zero_only_for_equivariant_maps(irreps_in, irreps_out):
    from equirelax.core._e3nn import o3

    d_in, d_out = o3.Irreps(irreps_in).dim, o3.Irreps(irreps_out).dim
    branch = LinearBranch(d_in, d_out, init="random", init_std=1.0)
    A_in, A_out = so3_generators(irreps_in), so3_generators(irreps_out)
    x = torch.randn(64, d_in)
    lie_random, norm = lie_derivative_terms(branch, x, A_in, A_out)
    assert lie_random > 1e-2 and norm > 0
    with torch.no_grad():
        branch.weight.copy_(HaarProjector(irreps_in, irreps_out, "SO3")(branch.weight))
    lie_equivariant, _ = lie_derivative_terms(branch, x, A_in, A_out)
    assert lie_equivariant < 1e-20


def test_lie_derivative_of_mlp_branch_uses_its_jacobian():
    branch = MLPBranch(4, 4, init="random", init_std=1.0)
    A = so3_generators("1x0e+1x1o")
    x = torch.randn(16, 4)
    lie, _ = lie_derivative_terms(branch, x, A, A)
    # finite-difference check of J_f(x) A x for the first generator
    t = 1e-6
    fd = (branch(x + t * x @ A[0].T) - branch(x - t * x @ A[0].T)) / (2 * t)
    manual = sum(
        ((fd if k == 0 else torch.autograd.functional.jvp(branch, x, x @ A[k].T)[1]) - branch(x) @ A[k].T).pow(2).sum()
        for k in range(3)
    ) / x.shape[0]
    assert float(lie) == pytest.approx(float(manual), rel=1e-5)


@pytest.mark.parametrize("regulariser", ["reference", "mean"])
def test_cr_regulariser_gradient_is_the_published_formula_at_the_reference_setting(regulariser):
    """100 systems × 5 nodes = 500 rows, two relaxed layers, default λ_reg = 0.01: the gradient CR adds to each
    branch equals autograd of the formula written out by hand with the dense so(3) generators."""
    from equirelax.core._e3nn import o3

    irreps = ["4x0e+2x1o+1x2e", "3x0e+2x1o+1x2e", "2x0e+1x1o"]
    model = torch.nn.Sequential(o3.Linear(irreps[0], irreps[1]), o3.Linear(irreps[1], irreps[2]))
    handle = equirelax.relax(model, "cr", branch="linear", schedule="constant", init="random", init_std=0.3,
                             **({} if regulariser == "reference" else {"regulariser": regulariser}))
    x = torch.randn(500, o3.Irreps(irreps[0]).dim)
    opt = handle.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()  # no task gradient: what the branches get is the regulariser's
    handle.after_backward()
    added = [handle.layers[str(i)].branch.weight.grad.clone() for i in range(2)]

    weights = [handle.layers[str(i)].branch.weight.detach().clone().requires_grad_(True) for i in range(2)]
    with torch.no_grad():
        inputs = [x, model[0](x)]  # each layer's input in the forward (the relaxed first layer's output)
    lie_terms, norm_terms = [], []
    for W, rows, a, b in zip(weights, inputs, irreps[:-1], irreps[1:]):
        A_in, A_out = so3_generators(a), so3_generators(b)
        lie = sum(((rows @ A_in[k].T) @ W.T - (rows @ W.T) @ A_out[k].T).pow(2).sum() for k in range(3))
        lie_terms.append((lie, rows.shape[0]))
        norm_terms.append(((rows @ W.T).pow(2).sum(), rows.shape[0]))
    if regulariser == "reference":  # sums over rows and layers, one square root per term
        reg = 0.01 * (torch.sqrt(sum(t for t, _ in lie_terms)) + torch.sqrt(sum(t for t, _ in norm_terms)))
    else:
        reg = 0.01 * sum(torch.sqrt(l / n) + torch.sqrt(m / n) for (l, n), (m, _) in zip(lie_terms, norm_terms))
    expected = torch.autograd.grad(reg, weights)
    for got, want in zip(added, expected):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-14)


def test_cr_regulariser_reaches_only_the_branch(model):
    x = torch.randn(32, model.irreps_in.dim)
    handle = equirelax.relax(model, "cr", schedule="constant", init="random", reg_weight=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle.wrap(opt)
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()  # task gradient is exactly zero
    handle.after_backward()
    for name, p in model.named_parameters():
        if ".branch." in name:
            assert p.grad.abs().sum() > 0, name
        elif p.grad is not None:
            assert p.grad.abs().sum() == 0, name


def test_blockwise_generator_action_equals_dense_generators():
    from equirelax.core.irreps import GeneratorAction

    irreps = "2x0e+1x1o+2x2e+1x3o"
    x = torch.randn(7, 2 + 3 + 10 + 7)
    dense = torch.einsum("kij,nj->kni", so3_generators(irreps), x)
    action = GeneratorAction(irreps)
    assert torch.allclose(action(x), dense, atol=1e-12)
    assert action(x[:0]).shape == (3, 0, x.shape[1])  # a layer that saw no rows this step
    # the adjoint used by CR's hand-taken gradients: Σ_k M_k A_k and Σ_k M_k A_kᵀ
    M = torch.randn(3, 5, x.shape[1])
    assert torch.allclose(action.contract(M), torch.einsum("kmi,kij->mj", M, so3_generators(irreps)), atol=1e-12)
    assert torch.allclose(action.contract(M, transposed=True),
                          torch.einsum("kmi,kji->mj", M, so3_generators(irreps)), atol=1e-12)


@pytest.mark.parametrize("kind,through_rank", [("linear", False), ("lowrank", False), ("lowrank", True)])
def test_closed_form_lie_derivative_equals_the_rowwise_one(kind, through_rank, monkeypatch):
    from equirelax.core.branches import make_branch
    from equirelax.core.controllers import cr
    from equirelax.core.irreps import GeneratorAction

    routes = []
    through = cr._lowrank_lie_derivative_terms
    monkeypatch.setattr(cr, "_lowrank_lie_derivative_terms", lambda *args: routes.append(1) or through(*args))
    irreps_in, irreps_out = "2x0e+1x1o+1x2e", "1x0e+2x1o+1x2o"
    # rank 1 on 40 rows takes the route through the rank, as large layers do; rank 4 the dense closed form
    rank = 1 if through_rank else 4
    branch = make_branch(kind, 10, 12, init="random", init_std=1.0, **({"rank": rank} if kind == "lowrank" else {}))
    x = torch.randn(40, 10)
    closed = lie_derivative_terms(branch, x, GeneratorAction(irreps_in), GeneratorAction(irreps_out))
    rowwise = lie_derivative_terms(branch, x, so3_generators(irreps_in), so3_generators(irreps_out))
    assert len(routes) == int(through_rank)
    assert float(closed[0]) == pytest.approx(float(rowwise[0]), rel=1e-10)
    assert float(closed[1]) == pytest.approx(float(rowwise[1]), rel=1e-10)
    # CR adds the regulariser's gradient on the branch: the closed forms must give the row-wise one
    params = list(branch.parameters())
    for closed_grad, rowwise_grad in zip(torch.autograd.grad(closed[0] + 0.3 * closed[1], params),
                                         torch.autograd.grad(rowwise[0] + 0.3 * rowwise[1], params)):
        assert torch.allclose(closed_grad, rowwise_grad, rtol=1e-10, atol=1e-10)
    ga = GeneratorAction(irreps_in)
    W = torch.randn(6, 10)
    assert torch.allclose(ga.right(W), W @ so3_generators(irreps_in), atol=1e-12)


@pytest.mark.parametrize("kind,route", [("lowrank", "rank"), ("lowrank", "closed"), ("linear", "closed"),
                                        ("lowrank", "rows"), ("mlp", "rows")])
@pytest.mark.parametrize("scalars", [False, True])
def test_hand_taken_regulariser_gradients_equal_autograd_of_the_rowwise_terms(kind, route, scalars, monkeypatch):
    """CR's gradients on the rank and closed-form routes are taken by hand (the generators' adjoints; between
    scalars, where LD is 0, N's alone): on every route and for any mix of the two terms they equal autograd of
    the row-wise terms with dense generators."""
    from equirelax.core.branches import make_branch
    from equirelax.core.controllers import cr
    from equirelax.core.irreps import GeneratorAction

    monkeypatch.setattr(cr, "_route", lambda branch, x, A_in, A_out: route if isinstance(A_in, GeneratorAction)
                        else "rows")
    irreps_in, irreps_out = ("20x0e", "17x0e") if scalars else ("2x0e+2x1o+1x2e+1x3o", "1x0e+2x1o+2x2o")
    torch.manual_seed(0)
    branch = make_branch(kind, 20, 17, init="random", init_std=1.0, **({"rank": 3} if kind == "lowrank" else {}))
    x = torch.randn(40, 20)
    lie, norm, gradients = cr.lie_derivative_terms_and_gradients(
        branch, x, GeneratorAction(irreps_in), GeneratorAction(irreps_out))
    rowwise = cr.lie_derivative_terms(branch, x, so3_generators(irreps_in), so3_generators(irreps_out))
    assert float(lie) == pytest.approx(float(rowwise[0].detach()), rel=1e-10) and (float(lie) > 1) != scalars
    assert float(norm) == pytest.approx(float(rowwise[1].detach()), rel=1e-10)
    params = list(branch.parameters())
    for alpha, beta in ((1.0, 0), (0, 1.0), (0.3, torch.tensor(-2.5))):
        expected = torch.autograd.grad(alpha * rowwise[0] + beta * rowwise[1], params, retain_graph=True)
        got = gradients(alpha, beta)
        assert list(got) == params
        for p, want in zip(params, expected):
            assert torch.allclose(got[p], want, rtol=1e-9, atol=1e-10), (alpha, beta)
