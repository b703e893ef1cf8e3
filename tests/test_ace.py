"""ACE: the equality and resilient forms at their budget-paced defaults, the papers' gradient form, and the
branch's equivariant part moved into the host layer."""

import copy

import pytest
import torch

import equirelax
from equirelax.core import hookimpl
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


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
