"""Controllers: CR schedule and Lie-derivative term, ACE primal-dual, RECM gap-bounded levels, state round trip."""

import copy
import functools
import statistics

import pytest
import torch

import equirelax
from equirelax.core import hookimpl
from equirelax.core.branches import LinearBranch, MLPBranch
from equirelax.core.controllers import cr_schedule, lie_derivative_terms
from equirelax.core.irreps import so3_generators
from equirelax.core.projection import HaarProjector
from equirelax.core.samples import remove_sample_split
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


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


# ---------------------------------------------------------------------------- ACE
class Recorder:
    """A plugin next to the controller: records γ and λ after every optimizer step."""

    def __init__(self):
        self.rows = []

    @hookimpl(trylast=True)
    def equirelax_after_optimizer_step(self, handle, finite):
        self.rows.append({n: (float(l.gamma.detach()), float(l.state("lambda"))) for n, l in handle.layers.items()})


def _train_ace(controller, kind, steps, lr, batch=64, loss_scale=1.0, n=2048, recorder=None, **options):
    """A plain loop at a constant learning rate, default options unless given: the user's budget is all ACE knows."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, controller, total_steps=steps, **options)
    if recorder is not None:
        handle.plugins.register(recorder)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr))
    x, y = make_task(kind, n, seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=generator)
        opt.zero_grad()
        (loss_scale * (model(x[idx]) - y[idx]).pow(2).mean()).backward()
        opt.step()
    return model, handle


@pytest.mark.parametrize("lr", [5e-3, 1e-3])
@pytest.mark.parametrize("steps", [75, 1000, pytest.param(10000, marks=pytest.mark.one_env)])
def test_ace_equality_ends_equivariant_with_its_defaults(steps, lr):
    recorder = Recorder()
    model, handle = _train_ace("ace", "symmetric", steps, lr, recorder=recorder)
    assert all(abs(g) <= 1e-2 for g in handle.levels().values()), handle.levels()
    # it acted: γ left its start, and the last 10% of steps settle instead of swinging through zero
    assert min(abs(row[n][0]) for row in recorder.rows for n in row) < 0.5
    tail = recorder.rows[int(0.9 * steps):]
    for name in handle.layers:
        values = [row[name][0] for row in tail]
        assert max(abs(v) for v in values) <= 2e-2, (name, max(values), min(values))
    with torch.no_grad():  # γ ≈ 0: the relaxed model is the projected one
        x, _ = make_task("symmetric", 256, seed=7)
        relaxed = model(x)
        with handle.projected():
            assert torch.allclose(model(x), relaxed, atol=5e-2 * float(relaxed.abs().mean()))


def test_ace_equality_relaxes_early_then_leaves_most_of_the_budget_to_the_equivariant_model():
    recorder = Recorder()
    _train_ace("ace", "symmetric", 1000, 5e-3, recorder=recorder)
    rows = recorder.rows
    assert all(rows[10][n][0] > 0.5 for n in rows[10]), rows[10]  # not snapped shut: the branch takes part early
    # small from 30% of the budget on and closed from 70% on (horizon 0.5 left up to 0.43 and 0.15 there)
    assert max(abs(g) for row in rows[300:] for g, _ in row.values()) <= 0.15
    assert max(abs(g) for row in rows[700:] for g, _ in row.values()) <= 0.02
    assert all(abs(rows[0][n][1]) < abs(rows[300][n][1]) for n in rows[0])  # λ grew
    # the resilient form keeps the longer horizon its slack estimate needs
    assert equirelax.relax(gated_e3nn_model(), "ace-resilient", total_steps=10).controller.options["horizon"] == 0.5


def test_ace_needs_the_budget_and_says_how_to_give_it(model):
    handle = equirelax.relax(model, "ace")
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-3))
    model(torch.randn(4, model.irreps_in.dim)).sum().backward()
    with pytest.raises(ValueError, match="total_steps"):
        opt.step()
    assert handle.step == 0 and all(float(layer.gamma) == 1.0 for layer in handle.layers.values())
    handle.set_total_steps(10)
    opt.step()
    assert handle.step == 1


def test_ace_gradient_form_is_the_papers_dual_ascent(model):
    """``dual='gradient'``: λ_{t+1} = λ_t + η_d γ_{t+1} exactly, the λ term in γ's gradient (reference form)."""
    recorder = Recorder()
    _train_ace("ace", "symmetric", 200, 1e-2, recorder=recorder, dual="gradient", dual_lr=1e-2)
    for before, after in zip(recorder.rows, recorder.rows[1:]):
        for name in after:
            assert after[name][1] == pytest.approx(before[name][1] + 1e-2 * after[name][0], abs=1e-12)


def test_ace_resilient_keeps_slack_where_the_symmetry_is_broken_at_any_loss_scale():
    ends = {}
    for scale in (1.0, 1e-3, 1e3):
        model, handle = _train_ace("ace-resilient", "field", 1000, 5e-3, loss_scale=scale)
        ends[scale] = handle.levels()
    # the field enters through the first linear (scalars → the vector output's direction) and reaches the last
    assert all(g > 0.1 for g in ends[1.0].values()), ends[1.0]
    for scale in (1e-3, 1e3):
        assert all(abs(ends[scale][n] - ends[1.0][n]) <= 0.05 for n in ends[1.0]), ends
    xt, yt = make_task("field", 512, seed=7)
    with torch.no_grad():
        relaxed = (model(xt) - yt).pow(2).mean()
        with handle.projected():
            projected = (model(xt) - yt).pow(2).mean()
    assert relaxed < 0.2 * projected


def test_ace_resilient_closes_on_symmetric_data():
    _, handle = _train_ace("ace-resilient", "symmetric", 1000, 5e-3)
    assert all(abs(g) <= 1e-2 for g in handle.levels().values()), handle.levels()


def test_ace_resilient_closes_on_symmetric_data_in_a_short_fine_tune():
    _, handle = _train_ace("ace-resilient", "symmetric", 75, 5e-3)
    assert all(abs(g) <= 1e-2 for g in handle.levels().values()), handle.levels()


@pytest.mark.parametrize("route", ["host weights", "dense leaves", "blockwise leaves"])
@pytest.mark.parametrize("forces", [False, True])
def test_ace_resilient_reads_a_low_rank_branch_as_its_dense_map(forces, route, monkeypatch):
    """The consistency signal is ∂J/∂γ along the branch's non-equivariant part, ⟨∂J/∂W, P⊥W⟩/γ: for a low-rank
    branch the same number as for a dense branch holding W = B·A, also through a loss on the input gradient
    (as forces are). Read as ∂J/∂γ less the host weights' gradient along P(W) where the host layer takes P(W)
    exactly (no extra work in the step), else from zero leaves the layer adds: a dense zero map (small layers)
    or, without forming B·A, a shift and block scalars (large ones)."""
    import copy

    from equirelax.core.controllers.ace import ACE
    from equirelax.core.layer import RelaxedLayer

    monkeypatch.setattr(RelaxedLayer, "BLOCKWISE_PROBE_ENTRIES", 0 if route == "blockwise leaves" else 10**9)

    torch.manual_seed(0)
    model = gated_e3nn_model()
    dense = copy.deepcopy(model)
    low = equirelax.relax(model, "ace-resilient", init="random", init_std=0.5, total_steps=10)
    full = equirelax.relax(dense, "ace-resilient", branch="linear", total_steps=10)
    controller = low.controller
    assert all(controller.readers.values())  # every o3.Linear here takes P(W) exactly
    if route != "host weights":
        controller.readers = dict.fromkeys(controller.readers)
        controller._choose_taps()
    with torch.no_grad():
        for name, layer in low.layers.items():
            full.layers[name].branch.weight.copy_(layer.branch.weight)
            layer.gamma.fill_(0.7)  # ∂J/∂γ is ⟨H, W⟩, at any γ
            full.layers[name].gamma.fill_(0.7)
    x, y = make_task("field", 64, seed=3)
    for m in (model, dense):
        inputs = x.clone().requires_grad_(forces)
        out = m(inputs)
        loss = (out - y).pow(2).mean()
        if forces:
            loss = loss + torch.autograd.grad(out.sum(), inputs, create_graph=True)[0].pow(2).mean()
        loss.backward()
    for name, layer in low.layers.items():
        assert not full.layers[name].tap_gradient
        assert layer.tap_gradient == (route != "host weights")
        expected = {"host weights": None, "dense leaves": {"dense"}, "blockwise leaves": {"shift", "blocks"}}[route]
        tapped = layer.__dict__.get("tapped")
        assert (set(tapped) if tapped else None) == expected
        read = ACE._task_gradient(layer, controller.readers[name])
        reference = ACE._task_gradient(full.layers[name])
        assert float(reference) != 0.0
        assert float(read) == pytest.approx(float(reference), rel=1e-6)
        assert layer.__dict__.get("tapped") is None  # read once, then released
    for p in model.parameters():  # a host evaluating with frozen parameters (MACE does): no tap, same output
        p.requires_grad_(False)
    before = model(x)
    assert all(layer.__dict__.get("tapped") is None for layer in low.layers.values())
    assert torch.allclose(before, dense(x), atol=1e-6)


def test_ace_resilient_taps_a_low_rank_branch_whose_host_layer_is_frozen():
    """A host layer whose weights do not train has no gradient to read ⟨H, P(W)⟩ from: from the next step on,
    that layer adds its zero leaves instead, and the signal is the same."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "ace-resilient", total_steps=10)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-3))
    x, y = make_task("field", 64, seed=3)
    assert not any(layer.tap_gradient for layer in handle.layers.values())
    for layer in handle.layers.values():
        layer.base.weight.requires_grad_(False)
    for _ in range(2):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    assert all(layer.tap_gradient for layer in handle.layers.values())
    assert all(float(layer.state("grad_weight")) > 0 for layer in handle.layers.values())  # both steps recorded


# --------------------------------------------------------------------------- RECM
RECM_STEPS = 1500


@functools.lru_cache(maxsize=None)
def _recm_run(kind="field", controller="recm", batch=64, n=2048, strength=1.0, gamma0=None, seed=0, lr=5e-3,
              steps=RECM_STEPS, split_by_position=False, allowance=None):
    """Epochs over a finite training set (reshuffled every epoch) at the user's budget, default options;
    (levels, gaps, test MSE). ``split_by_position``: RECM's maps split each batch's rows by position."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        model = gated_e3nn_model()
        options = {} if gamma0 is None else {"gamma0": gamma0}
        if allowance is not None:
            options["allowance"] = allowance
        handle = equirelax.relax(model, controller, total_steps=steps, **options)
        if split_by_position:
            remove_sample_split(model)
        opt = handle.wrap(torch.optim.Adam(model.parameters(), lr))
        x, y = make_task(kind, n, seed=seed, field_strength=strength)
        generator = torch.Generator().manual_seed(seed)
        step = 0
        while step < steps:
            for rows in torch.randperm(n, generator=generator).split(batch):
                if step == steps:
                    break
                opt.zero_grad()
                (model(x[rows]) - y[rows]).pow(2).mean().backward()
                opt.step()
                step += 1
            handle.epoch_end()
        xt, yt = make_task(kind, 1024, seed=100 + seed, field_strength=strength)
        with torch.no_grad():
            test = float((model(xt) - yt).pow(2).mean())
        gaps = {n: v for n, v in handle.metrics().items() if n.startswith("recm/gap/")}
        return handle.levels(), gaps, test
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.one_env
def test_recm_level_follows_the_field_not_the_batch_size_or_the_start():
    levels, gaps, _ = _recm_run()
    # the field enters at the first linear (input scalars → the vector output's direction): fully relaxed there
    assert levels["0"] > 0.9, (levels, gaps)
    small, large = _recm_run(batch=16)[0], _recm_run(batch=256)[0]
    assert abs(small["0"] - large["0"]) <= 0.1, (small, large)
    from_zero = _recm_run(gamma0=0.0)[0]
    assert abs(from_zero["0"] - levels["0"]) <= 0.05, (from_zero, levels)
    weak = _recm_run(strength=0.03)[0]
    assert weak["0"] <= levels["0"] / 3 and all(g <= 0.05 for g in weak.values()), (weak, levels)


@pytest.mark.parametrize("warmup", [0.5, 0.0])
def test_recm_warmup_moves_from_the_start_to_the_measured_level(warmup):
    """γ = (1 − w)·γ0 + w·level, w rising linearly to 1 at ``warmup`` × the budget (w = 1 throughout by default):
    at the first probe the maps are still zero (measured level 0); from then on the measured level alone."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", total_steps=80, warmup=warmup)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))
    x, y = make_task("field", 64)
    levels = []
    for _ in range(80):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        levels.append(handle.levels())
    first = 1 - 4 / 40 if warmup else 0.0  # the 4th step probes first: w = 4 / (0.5 · 80)
    assert all(levels[3][name] == pytest.approx(first, abs=1e-12) for name in levels[3]), levels[3]
    assert all(levels[2][name] == 1.0 for name in levels[2])  # no probe yet: γ0
    gaps = {name[len("recm/gap/"):]: v for name, v in handle.metrics().items() if name.startswith("recm/gap/")}
    assert levels[-1] == pytest.approx({name: min(1.0, gap / 0.05) for name, gap in gaps.items()}, abs=1e-6)


@pytest.mark.parametrize("host_lr,loss_scale", [(1e-3, 1.0), (1e-1, 1.0), (1e-2, 1e3)])
def test_recm_trains_its_probe_maps_itself_whatever_the_host_optimizer(host_lr, loss_scale):
    """The probe maps are buffers the host's optimizer never holds; RECM's own Adam, one second moment per map,
    moves B along its gradient by ``probe_lr`` in rms on its first update (B starts at zero), whatever the host's
    learning rate or loss scale."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", total_steps=40)
    assert not any("probe_" in name for name, _ in model.named_parameters())
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr=host_lr))
    x, y = make_task("field", 64)
    for _ in range(4):  # the 4th step is the first probing step
        opt.zero_grad()
        (loss_scale * (model(x) - y).pow(2).mean()).backward()
        opt.step()
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not any(id(buffer) in held for name, buffer in model.named_buffers() if "probe_" in name)
    for layer in handle.layers.values():
        for side in range(2):
            moved, grad = layer.probe_B[side].double(), layer.state("probe_mB")[side] / (1 - 0.9)
            assert float(moved.pow(2).mean().sqrt()) == pytest.approx(0.01, rel=1e-4)
            # along the gradient, not its sign: the entries keep their gradients' proportions
            assert torch.allclose(moved, -0.01 * grad / grad.pow(2).mean().sqrt(), rtol=1e-4, atol=1e-9)
            assert float(moved.abs().max() / moved.abs().min()) > 1.5  # (a sign step moves all by 0.01)


class _ProbeSteps:
    """Records the optimizer steps on which RECM's layers probed."""

    def __init__(self):
        self.steps = []

    @hookimpl(tryfirst=True)
    def equirelax_after_backward(self, handle, finite):
        if any(layer.probing for layer in handle.layers.values()):
            self.steps.append(handle.controller.steps)


@pytest.mark.parametrize("total_steps,options,every", [
    (480, {}, 4), (10_000, {}, 4), (10_001, {}, 5), (50_000, {}, 20), (50_000, {"probe_every": 4}, 4),
    (50_000, {"probe_every_saturated": 8}, 20)])
def test_recm_probes_about_2500_times_in_a_long_run(total_steps, options, every):
    """By default a run probes every 4th step, or about 2500 times in all where that is rarer (every 20th step
    of a 50000-step training): the interval follows the budget a host gives after relaxing, an explicit
    ``probe_every`` is kept, and the saturated cap never undercuts it."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", **options)
    handle.set_total_steps(total_steps)  # as a host plugin does, after relaxing
    probes = _ProbeSteps()
    handle.plugins.register(probes)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
    x, y = make_task("field", 64)
    for _ in range(3 * every):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    assert probes.steps == [every - 1, 2 * every - 1, 3 * every - 1]
    assert handle.controller.rate(handle) == pytest.approx(1 / (1 + 0.2 * total_steps / every))
    assert all(int(layer.state("probe_interval")) == every for layer in handle.layers.values())
    handle.controller.last_probe = 3 * every - 1
    for layer in handle.layers.values():
        layer.gamma.data.fill_(1.0)
    handle.epoch_end()  # every level saturated: the interval doubles, up to the cap (never below the interval)
    assert handle.controller.interval == min(2 * every, max(options.get("probe_every_saturated", 4 * every), every))


def test_recm_without_a_budget_says_so_before_the_first_optimizer_step():
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm")
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
    before = copy.deepcopy(model.state_dict())
    x, y = make_task("field", 64)
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(ValueError, match="recm needs the run's total number of optimizer steps"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recm_probes_less_often_while_every_level_is_saturated():
    """The README example in the field (every level reaches 1): probing steps every 4, then, from the epoch
    that ends with every level at 1, every 8 and 16 (each costs the branch a step); a level below 1 at an
    epoch's end sets it back to 4; a checkpoint carries the schedule."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    x, y = make_task("field", 512)
    handle = equirelax.relax(model, "recm", targets=["0", "2"], branch="linear", total_steps=480)
    probes = _ProbeSteps()
    handle.plugins.register(probes)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))

    def epochs(count):
        for _ in range(count):
            for i in range(0, 512, 64):
                opt.zero_grad()
                (model(x[i:i + 64]) - y[i:i + 64]).pow(2).mean().backward()
                opt.step()
            handle.epoch_end()

    epochs(60)
    gaps = [b - a for a, b in zip(probes.steps, probes.steps[1:])]
    assert probes.steps[0] == 3 and gaps[:10] == [4] * 10, probes.steps
    assert set(gaps) == {4, 8, 16} and gaps[-5:] == [16] * 5, (gaps, handle.levels(), handle.controller.interval)
    assert handle.levels() == {"0": 1.0, "2": 1.0}
    # the EMA keeps its horizon in steps: a probe 16 steps after the last weighs 4 probes' worth
    assert handle.controller.rate(handle, 16) == pytest.approx(4 * handle.controller.rate(handle))

    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), handle.state_dict()))
    model2 = copy.deepcopy(model)
    handle2 = equirelax.RelaxHandle.attach(model2)
    model2.load_state_dict(saved[0])
    handle2.load_state_dict(saved[2])
    assert (handle2.controller.last_probe, handle2.controller.interval) == (probes.steps[-1], 16)

    for layer in handle.layers.values():
        layer.gamma.data.fill_(0.5)
    handle.epoch_end()
    assert handle.controller.interval == 4
    before = len(probes.steps)
    epochs(1)
    assert probes.steps[before:] and all(b - a == 4 for a, b in zip(probes.steps[before:], probes.steps[before + 1:]))


def _probe_sizes(model, handle, x):
    """‖P⊥V_k x‖ / ‖f_eq(x)‖ of each layer's two probe maps on ``x`` (a probing forward, nothing trained)."""
    for layer in handle.layers.values():
        layer.probing = True
    model(x)
    sizes = {name: [float((layer.probe_sums[k] / layer.probe_sums[2]).sqrt()) for k in (3, 4)]
             for name, layer in handle.layers.items()}
    for layer in handle.layers.values():
        layer.probe_sums, layer.probe_leaves, layer.probing = None, None, False
    return sizes


@pytest.mark.parametrize("limit", [2.0, 1e6])
def test_recm_probe_maps_stay_within_their_limit(limit):
    """A level saturates at τ, so each probe map is kept at most ``probe_limit`` × τ of the layer's output
    (under a slowly learning host the two maps otherwise grow to the size of the output itself)."""
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", total_steps=240, probe_limit=limit)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = make_task("field", 512)
    for _ in range(30):
        for i in range(0, 512, 64):
            opt.zero_grad()
            (model(x[i:i + 64]) - y[i:i + 64]).pow(2).mean().backward()
            opt.step()
    largest = max(max(pair) for pair in _probe_sizes(model, handle, x).values())
    if limit == 2.0:
        assert largest <= 1.5 * 2.0 * 0.05, largest  # (the step after the last scaling adds to it)
    else:
        assert largest > 0.3, largest  # what the limit prevents


@pytest.mark.parametrize("n,batch", [(256, 64), (2048, 64), (2048, 256), (131072, 64)])
def test_recm_recovers_equivariance_on_symmetric_data(n, batch):
    """Finite training sets of 256 and 2048 samples trained for 6 to 190 epochs, and a stream of fresh data."""
    levels, gaps, _ = _recm_run("symmetric", n=n, batch=batch)
    assert all(g <= 0.05 for g in levels.values()), (levels, gaps)


@pytest.mark.parametrize("shape", ["isotropic", "anisotropic"])
def test_recm_noise_allowance_has_the_scatter_of_two_independent_noise_maps(shape):
    """Two maps, each a gradient's noise Σ δ xᵀ over rows drawn independently: their agreement ⟨N_a x, N_b x⟩ over
    a set of rows scatters by ν²/√p, p from the rows' second moments. Anisotropic rows (a few dominant
    directions, as a trained model's features have) spread it over far fewer than d_in·d_out entries."""
    from equirelax.core.controllers.recm import independent_entries

    generator = torch.Generator().manual_seed(0)
    d_in, d_out, rows, draws = 12, 6, 20, 6000
    decay = 0.0 if shape == "isotropic" else 0.25
    input_scale = torch.exp(-decay * torch.arange(d_in, dtype=torch.float64))
    output_scale = torch.exp(-decay * torch.arange(d_out, dtype=torch.float64))
    x = torch.randn(256, d_in, generator=generator, dtype=torch.float64) * input_scale

    def noise_maps():
        delta = torch.randn(draws, rows, d_out, generator=generator, dtype=torch.float64) * output_scale
        inputs = torch.randn(draws, rows, d_in, generator=generator, dtype=torch.float64) * input_scale
        return delta.transpose(1, 2) @ inputs  # [draws, d_out, d_in]

    first, second = x @ noise_maps().transpose(1, 2), x @ noise_maps().transpose(1, 2)
    agreement = (first * second).sum(dim=(1, 2))
    noise = (first - second).pow(2).sum(dim=(1, 2)) / 2
    measured = float(agreement.std() / noise.mean())
    p = float(independent_entries(x.T @ x, torch.diag(output_scale**2), otherwise=float("nan")))
    assert abs(measured * p**0.5 - 1) < 0.1, (measured, 1 / p**0.5, p)
    if shape == "isotropic":
        assert abs(p - d_in * d_out) < 0.3 * d_in * d_out, p
    else:
        assert p < d_in * d_out / 4, p


def test_recm_sketches_a_wide_layers_moments_and_reads_the_same_entries():
    """A moment wider than SKETCH_COLUMNS is kept as its product with fixed random vectors (a checkpoint holds
    d × 64 numbers, not d × d): the p it gives is the whole moments' to within 15%, and it sums over batches."""
    from equirelax.core.controllers.recm import SKETCH_COLUMNS, independent_entries, moment_sketch

    generator = torch.Generator().manual_seed(1)
    for d_in, d_out, decay in ((300, 200, 0.05), (480, 96, 0.2), (1000, 40, 0.01)):
        scale_in = torch.exp(-decay * torch.arange(d_in, dtype=torch.float64))
        scale_out = torch.exp(-decay * torch.arange(d_out, dtype=torch.float64))
        x = torch.randn(4000, d_in, generator=generator, dtype=torch.float64) * scale_in
        y = torch.randn(4000, d_out, generator=generator, dtype=torch.float64) * scale_out
        inputs, outputs = x.T @ x, y.T @ y
        exact = (inputs.pow(2).sum() ** 2 / (inputs @ inputs).pow(2).sum()
                 * torch.diagonal(outputs).sum() ** 2 / outputs.pow(2).sum())
        sketched = independent_entries(moment_sketch(x[:1000]) + moment_sketch(x[1000:]), moment_sketch(y),
                                       otherwise=float("nan"))
        assert moment_sketch(x).shape == (d_in, SKETCH_COLUMNS)
        assert abs(float(sketched / exact) - 1) < 0.15, (d_in, float(sketched), float(exact))


@pytest.mark.one_env
def test_recm_reads_no_level_off_a_finite_symmetric_set_the_host_has_not_fitted_yet():
    """512 samples reshuffled every epoch, host Adam at 1e-3, 480 steps (the host far from fitting the set):
    each probe map learns from its own half of the samples, so they share no orientations of the set.
    Split by position, both maps met every sample: levels 0.34 and 1.0 on seeds 0 and 1 (4 of seeds 0-5). Split
    by sample a few initialisations still read a level off layer 2, downstream (seeds 0-15: 2 of 16, with Adam's
    per-entry or per-map second moment on the probes alike), and none off layer 0, where the inputs enter: two
    independent noise maps agree by chance there beyond RECM's allowance, whose scatter is wider on layer 2 than
    it assumes (RECM's docstring, "What it cannot tell apart"; ``benchmarks/recm_noise.py``). With ``allowance:
    rows`` (p from the rows' second moments) none does."""
    runs = [_recm_run("symmetric", n=512, lr=1e-3, steps=480, seed=seed) for seed in range(12)]
    assert all(levels["0"] <= 0.05 for levels, _, _ in runs), [levels for levels, _, _ in runs]
    misread = [levels for levels, _, _ in runs if max(levels.values()) > 0.05]
    assert len(misread) <= 2, misread
    rows = [_recm_run("symmetric", n=512, lr=1e-3, steps=480, seed=seed, allowance="rows") for seed in range(12)]
    assert all(max(levels.values()) <= 0.05 for levels, _, _ in rows), [levels for levels, _, _ in rows]


@pytest.mark.one_env
def test_recm_relaxed_model_is_as_accurate_as_the_fixed_branch():
    # probing steps train the host model too (with the probe maps standing in for the branch's broken part)
    recm = statistics.mean(_recm_run(seed=seed)[2] for seed in range(3))
    fixed = statistics.mean(_recm_run(controller="fixed", seed=seed)[2] for seed in range(3))
    assert recm <= 1.1 * fixed, (recm, fixed)


# ---------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "controller,options",
    [("cr", {"epochs": 6}), ("cr", {"epochs": 8, "total_steps": 40}), ("ace", {"total_steps": 40}), ("ace-resilient", {"total_steps": 40}),
     ("recm", {"probe_every": 3, "total_steps": 40}), ("recm", {"allowance": "rows", "total_steps": 40}),
     ("fixed", {})],
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


def test_recm_checkpoint_from_before_its_probe_optimizer_resumes(train_loop):
    """RECM checkpoints written while the probe maps were host parameters hold no moments for RECM's own
    step: a host's strict load takes them (the moments start afresh, with a warning); other missing
    controller state still fails."""
    x, y = make_task("field", 256)

    def fresh():
        torch.manual_seed(0)
        model = gated_e3nn_model()
        handle = equirelax.relax(model, "recm", init="random", probe_every=3, total_steps=40)
        return model, handle, handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))

    model, handle, opt = fresh()
    train_loop(model, handle, x, y, steps=20, optimizer=opt, seed=1)
    old = {key: value for key, value in model.state_dict().items()
           if not any(part in key for part in ("ctrl_probe_m", "ctrl_probe_v", "ctrl_probe_updates", "ctrl_last_probe",
                                                "ctrl_probe_interval"))}
    assert len(old) < len(model.state_dict())
    model2, handle2, opt2 = fresh()
    with pytest.warns(UserWarning, match="ctrl_probe_mA.*starts afresh"):
        model2.load_state_dict(old)  # strict, as MACE's and Lightning's checkpoint loading are
    for name, layer in handle2.layers.items():
        trained = handle.layers[name]
        assert torch.equal(layer.probe_B, trained.probe_B) and torch.equal(layer.state("gap"), trained.state("gap"))
        assert int(layer.state("probe_updates")) == 0 and not layer.state("probe_mB").any()
    handle2.resync()  # as the host plugins do after loading: the probing schedule of then, every 3rd step
    assert (handle2.controller.steps, handle2.controller.last_probe, handle2.controller.interval) == (20, 17, 3)
    train_loop(model2, handle2, x, y, steps=6, optimizer=opt2, seed=2)
    assert all(int(layer.state("probe_updates")) == 2 for layer in handle2.layers.values())
    without_gap = {key: value for key, value in old.items() if not key.endswith("ctrl_gap")}
    with pytest.raises(RuntimeError, match="ctrl_gap"):
        fresh()[0].load_state_dict(without_gap)


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


@pytest.mark.parametrize("controller,options", [("ace-resilient", {"total_steps": 30}),
                                                ("recm", {"probe_every": 3, "total_steps": 30}),
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


def _controller_steps_only(model, handle, x, y, steps):
    """Training steps at lr 0: only the controller moves anything; ACE's γ closes by the budget's end."""
    opt = handle.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    assert all(abs(g) <= 1e-2 for g in handle.levels().values())


@pytest.mark.parametrize("branch", ["linear", "lowrank"])
def test_ace_budget_step_moves_the_equivariant_part_it_takes_off_gamma_into_the_host(model, branch):
    """With no task gradient (lr 0) only the controller moves γ: the projected model (what export ships) is
    unchanged by its steps, and the relaxed model loses only the branch's symmetry-breaking part."""
    handle = equirelax.relax(model, "ace", branch=branch, init="random", init_std=0.3, total_steps=20,
                             keep_equivariant_part=True, **({"rank": 3} if branch == "lowrank" else {}))
    x, y = make_task("field", 64)
    with torch.no_grad(), handle.projected():
        projected = model(x)
    _controller_steps_only(model, handle, x, y, steps=20)
    with torch.no_grad():
        with handle.projected():
            assert torch.allclose(model(x), projected, atol=1e-12, rtol=0)
        relaxed = model(x)
    equirelax.export(model)
    assert torch.allclose(model(x), projected, atol=1e-12, rtol=0)
    assert torch.allclose(relaxed, projected, atol=0.02 * float(projected.abs().max()))


def test_ace_by_default_leaves_the_host_weights_to_the_optimizer(model):
    """The default (keep_equivariant_part=False): shrinking γ drops the whole branch, the host layers never
    change (lr 0)."""
    handle = equirelax.relax(model, "ace", branch="linear", init="random", init_std=0.3, total_steps=20)
    assert handle.controller.options["keep_equivariant_part"] is False
    assert equirelax.relax(gated_e3nn_model(), "ace-resilient", total_steps=10).controller.options[
        "keep_equivariant_part"] is True  # the resilient form keeps it, as measured
    host = {name: p.detach().clone() for name, p in model.named_parameters() if ".base." in name}
    x, y = make_task("field", 64)
    _controller_steps_only(model, handle, x, y, steps=20)
    assert host and all(torch.equal(p, host[name]) for name, p in model.named_parameters() if name in host)
    with pytest.raises(ValueError, match="'keep_equivariant_part' must be true or false"):
        equirelax.relax(gated_e3nn_model(), "ace", keep_equivariant_part="no", total_steps=10)


def test_merge_plan_of_a_low_rank_map_equals_that_of_its_dense_projection():
    """``MergePlan.add_coefficients`` of P(B·A)'s block scalars (ACE's per-step merge of a low-rank branch)
    adds to the o3.Linear what the plan adds for the dense P(B·A), here on irreps with one type in several runs."""
    import copy

    from equirelax.adapters.e3nn import E3nnAdapter
    from equirelax.core._e3nn import o3

    model = torch.nn.Sequential(o3.Linear("3x0e+2x1o+2x0e+1x2e", "2x0e+3x1o+1x2e+1x0e").to(torch.float64))
    handle = equirelax.relax(model, "ace", branch="lowrank", rank=3, total_steps=10, keep_equivariant_part=True)
    layer = next(iter(handle.layers.values()))
    twin, before = copy.deepcopy(layer), layer.base.weight.detach().clone()
    plans = [E3nnAdapter().merge_plan(one) for one in (layer, twin)]
    g = torch.Generator().manual_seed(0)
    B = torch.randn(layer.irreps_out.dim, 3, generator=g, dtype=torch.float64)
    A = torch.randn(3, layer.feature_dim, generator=g, dtype=torch.float64)
    plans[0].add_coefficients(layer.projector.lowrank_coefficients(B, A))
    plans[1](layer.equivariant_weight(B @ A))
    assert (layer.base.weight - before).abs().min() > 1e-6  # every weight moved
    assert torch.allclose(layer.base.weight, twin.base.weight, atol=1e-12, rtol=0)


def test_ace_state_brings_back_whether_it_keeps_the_equivariant_part():
    """The option comes back with the state, and the controller acts on it; a state saved before the option
    existed was trained keeping the part."""
    saved = equirelax.relax(gated_e3nn_model(), "ace", total_steps=10, keep_equivariant_part=True).state_dict()
    old = {**saved, "options": {k: v for k, v in saved["options"].items() if k != "keep_equivariant_part"}}
    for state in (saved, old):
        handle = equirelax.relax(gated_e3nn_model(), "ace", total_steps=10)
        assert all(plan is None for plan in handle.controller.plans.values())
        handle.load_state_dict(state)
        assert handle.controller.options["keep_equivariant_part"] is True
        assert all(plan is not None for plan in handle.controller.plans.values())
