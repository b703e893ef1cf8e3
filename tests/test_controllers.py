"""Controllers: CR schedule and Lie-derivative term, ACE primal-dual, RECM gap-bounded levels, state round trip."""

import copy

import pytest
import torch

import equirelax
from equirelax.core import hookimpl
from equirelax.core.branches import LinearBranch, MLPBranch
from equirelax.core.controllers import cr_schedule, lie_derivative_terms
from equirelax.core.irreps import so3_generators
from equirelax.core.projection import HaarProjector
from equirelax.core.synthetic import gated_e3nn_model, make_task


# ----------------------------------------------------------------------------- CR
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


# ---------------------------------------------------------------------------- ACE
class Recorder:
    """A plugin next to the controller: records γ and λ after every optimizer step."""

    def __init__(self):
        self.rows = []

    @hookimpl(trylast=True)
    def equirelax_after_optimizer_step(self, handle, finite):
        self.rows.append({n: (float(l.gamma.detach()), float(l.state("lambda"))) for n, l in handle.layers.items()})


def _train_decaying(model, handle, x, y, steps, lr=1e-2, batch=64):
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator)
        opt.zero_grad()
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        scheduler.step()


def test_ace_equality_drives_every_gamma_to_zero_by_dual_ascent(model):
    x, y = make_task("symmetric", 4096)
    handle = equirelax.relax(model, "ace", dual_lr=1e-2, augmented=1.0)
    recorder = Recorder()
    handle.plugins.register(recorder)
    _train_decaying(model, handle, x, y, steps=1500)
    assert all(abs(g) < 1e-3 for g in handle.levels().values()), handle.levels()
    # λ_{t+1} = λ_t + η_d γ_{t+1}, exactly, at every step
    for before, after in zip(recorder.rows, recorder.rows[1:]):
        for name in after:
            assert after[name][1] == pytest.approx(before[name][1] + 1e-2 * after[name][0], abs=1e-12)


def test_ace_resilient_keeps_slack_where_the_symmetry_is_broken(model):
    x, y = make_task("field", 2048)
    handle = equirelax.relax(model, "ace-resilient")
    _train_decaying(model, handle, x, y, steps=1500)
    slack = {n: float(l.state("slack")) for n, l in handle.layers.items()}
    gammas = handle.levels()
    helped = [n for n in handle.layers if abs(gammas[n]) > 0.01 and slack[n] > 0.01]
    assert helped, (gammas, slack)
    xt, yt = make_task("field", 512, seed=7)
    with torch.no_grad():
        relaxed = (model(xt) - yt).pow(2).mean()
        with handle.projected():
            projected = (model(xt) - yt).pow(2).mean()
    assert relaxed < 0.2 * projected


# --------------------------------------------------------------------------- RECM
def _recm_run(kind, steps=2000, lr=1e-2):
    """RECM on a stream of fresh batches: the data distribution itself, not a finite sample of it."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm")
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-3)
    for step in range(steps):
        x, y = make_task(kind, 64, seed=10_000 + step)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        scheduler.step()
    return model, handle


def test_recm_recovers_equivariance_on_symmetric_data():
    model, handle = _recm_run("symmetric")
    levels = handle.levels()
    assert set(levels) == {"0", "2"}
    assert all(g < 0.05 for g in levels.values()), levels


def test_recm_keeps_relaxation_where_the_symmetry_is_broken():
    model, handle = _recm_run("field")
    levels = handle.levels()
    assert all(g > 0.1 for g in levels.values()), levels
    metrics = handle.metrics()
    assert all(metrics[f"recm/gap/{n}"] > 0.1 for n in levels)
    # bounded by the gap: γ ≤ min(1, s/τ) up to the contraction's lag
    assert all(levels[n] <= min(1.0, metrics[f"recm/gap/{n}"]) + 0.1 for n in levels)


def _recm_finite_run(kind, correction, n=256, batch=64, epochs=300):
    """RECM over epochs of a fixed training set of ``n`` samples: K = n / batch steps per epoch."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", finite_sample_correction=correction)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))
    x, y = make_task(kind, n, seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(n, generator=generator).split(batch):
            opt.zero_grad()
            (model(x[rows]) - y[rows]).pow(2).mean().backward()
            opt.step()
        handle.epoch_end()
    return handle


def test_recm_discounts_the_gap_of_a_finite_training_set():
    # 256 symmetric samples: their own orientations leave a gap the uncorrected estimate takes for a broken symmetry
    corrected = _recm_finite_run("symmetric", True)
    uncorrected = _recm_finite_run("symmetric", False)
    assert all(int(layer.state("epoch_steps")) == 4 for layer in corrected.layers.values())
    assert all(g > 0.25 for g in uncorrected.levels().values()), uncorrected.levels()
    assert all(g < 0.15 for g in corrected.levels().values()), corrected.levels()
    # a real broken symmetry is far above that floor and keeps its level
    assert all(g > 0.5 for g in _recm_finite_run("field", True).levels().values())


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "controller,options",
    [("cr", {"epochs": 6}), ("ace", {}), ("ace-resilient", {}), ("recm", {"probe_every": 3}), ("fixed", {})],
)
def test_resume_from_state_dict_reproduces_uninterrupted_training(controller, options, train_loop):
    x, y = make_task("field", 256)

    def fresh():
        torch.manual_seed(0)
        model = gated_e3nn_model()
        handle = equirelax.relax(model, controller, init="random", **options)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        handle.wrap(opt)
        return model, handle, opt

    model, handle, opt = fresh()
    train_loop(model, handle, x, y, steps=20, optimizer=opt, epoch_every=5, seed=1)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), handle.state_dict()))
    continued = train_loop(model, handle, x, y, steps=20, optimizer=opt, epoch_every=5, seed=2)
    levels, state = handle.levels(), handle.state_dict()

    model2, handle2, opt2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    handle2.load_state_dict(saved[2])
    resumed = train_loop(model2, handle2, x, y, steps=20, optimizer=opt2, epoch_every=5, seed=2)
    assert resumed == continued
    assert handle2.levels() == levels
    for name, entry in state["layer_state"].items():
        for key, value in entry.items():
            assert torch.equal(handle2.state_dict()["layer_state"][name][key], value), (name, key)
    assert handle2.epoch == handle.epoch == 8


def test_blockwise_generator_action_equals_dense_generators():
    from equirelax.core.irreps import GeneratorAction

    irreps = "2x0e+1x1o+2x2e+1x3o"
    x = torch.randn(7, 2 + 3 + 10 + 7)
    dense = torch.einsum("kij,nj->kni", so3_generators(irreps), x)
    assert torch.allclose(GeneratorAction(irreps)(x), dense, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "lowrank"])
def test_closed_form_lie_derivative_equals_the_rowwise_one(kind):
    from equirelax.core.branches import make_branch
    from equirelax.core.irreps import GeneratorAction

    irreps_in, irreps_out = "2x0e+1x1o+1x2e", "1x0e+2x1o+1x2o"
    branch = make_branch(kind, 10, 12, init="random", init_std=1.0, **({"rank": 4} if kind == "lowrank" else {}))
    x = torch.randn(40, 10)
    closed = lie_derivative_terms(branch, x, GeneratorAction(irreps_in), GeneratorAction(irreps_out))
    rowwise = lie_derivative_terms(branch, x, so3_generators(irreps_in), so3_generators(irreps_out))
    assert float(closed[0]) == pytest.approx(float(rowwise[0]), rel=1e-10)
    assert float(closed[1]) == pytest.approx(float(rowwise[1]), rel=1e-10)
    ga = GeneratorAction(irreps_in)
    W = torch.randn(6, 10)
    assert torch.allclose(ga.right(W), W @ so3_generators(irreps_in), atol=1e-12)


@pytest.mark.parametrize("controller,options", [("ace-resilient", {}), ("recm", {"probe_every": 3}),
                                                ("cr", {"epochs": 6})])
def test_attach_rebuilds_the_handle_of_a_copied_model_with_its_state(controller, options, train_loop):
    """A model deep-copied or unpickled (as host trainers do) gets a handle back from its own layers."""
    import io

    x, y = make_task("field", 256)
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, controller, init="random", **options)
    train_loop(model, handle, x, y, steps=15, epoch_every=5, seed=1)
    assert equirelax.RelaxHandle.attach(model) is handle  # the live handle, not a second one

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    rebuilt = [equirelax.RelaxHandle.attach(c) for c in copies]
    for other in rebuilt:
        assert other is not handle and other.controller.name == handle.controller.name
        assert other.controller.options == handle.controller.options
        assert other.levels() == handle.levels() and other.epoch == handle.epoch == 3
        for name, entry in handle.state_dict()["layer_state"].items():
            for key, value in entry.items():
                assert torch.equal(other.state_dict()["layer_state"][name][key], value), (name, key)
    # each rebuilt handle drives its copy exactly as the original handle drives the original
    reference = train_loop(model, handle, x, y, steps=12, epoch_every=5, seed=2,
                           optimizer=torch.optim.SGD(model.parameters(), 1e-2))
    for copied, other in zip(copies, rebuilt):
        losses = train_loop(copied, other, x, y, steps=12, epoch_every=5, seed=2,
                            optimizer=torch.optim.SGD(copied.parameters(), 1e-2))
        assert losses == reference
        assert other.levels() == handle.levels()
