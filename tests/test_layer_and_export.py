"""Relaxed layers leave the host untouched at γ = 0; export returns the host's own, exactly equivariant model."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import equirelax
from equirelax.core._e3nn import o3
from equirelax.datasets.synthetic import IRREPS_IN, make_task

CONTROLLERS = [("fixed", {}), ("cr", {"epochs": 4}), ("ace", {}), ("ace-resilient", {}), ("recm", {})]


@pytest.mark.parametrize("controller,options", CONTROLLERS)
@pytest.mark.parametrize("branch", ["linear", "lowrank", "mlp"])
def test_pretrained_safe_init_is_bit_identical(model, controller, options, branch):
    x = torch.randn(32, o3.Irreps(IRREPS_IN).dim)
    reference = model(x)
    reference_grads = torch.autograd.grad(reference.pow(2).sum(), list(model.parameters()))
    handle = equirelax.relax(model, controller, branch=branch, **options)
    out = model(x)
    assert torch.equal(out, reference)
    host_params = [p for n, p in model.named_parameters()
                   if ".branch." not in n and not n.endswith(("gamma", "probe_A", "probe_B"))]
    grads = torch.autograd.grad(out.pow(2).sum(), host_params)
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))
    assert handle.levels()  # every targeted layer has a level


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["linear", "lowrank", "mlp"]))
def test_gamma_zero_reproduces_host_bit_for_bit_with_trained_branch(seed, branch):
    torch.manual_seed(seed)
    from equirelax.datasets.synthetic import gated_e3nn_model

    host = gated_e3nn_model().double()
    x = torch.randn(16, host.irreps_in.dim, dtype=torch.float64)
    reference = host(x)
    equirelax.relax(host, "fixed", branch=branch, init="random", init_std=1.0, gamma=0.0)
    assert torch.equal(host(x), reference)


def test_random_init_changes_output_and_branch_is_gated(model):
    x = torch.randn(8, model.irreps_in.dim)
    reference = model(x)
    handle = equirelax.relax(model, "fixed", init="random", init_std=0.1)
    assert not torch.allclose(model(x), reference)
    with handle.equivariant():
        assert torch.equal(model(x), reference)


def _trained(model, controller="fixed", branch="linear", steps=60, **options):
    x, y = make_task("field", 256, seed=1)
    if branch == "lowrank":
        options.setdefault("rank", 3)
    handle = equirelax.relax(model, controller, branch=branch, init="random", **options)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return handle, x


@pytest.mark.parametrize("branch", ["linear", "lowrank"])
def test_export_merge_is_equivariant_and_equals_projected_model(model, branch):
    handle, x = _trained(model, branch=branch)
    assert equirelax.equivariance_error(model, x).mean > 1e-3  # the relaxed model is not equivariant
    with handle.projected():
        projected = model(x)
    with handle.equivariant():
        equivariant_only = model(x)
    assert not torch.allclose(projected, equivariant_only)  # merging keeps something dropping loses
    equirelax.export(model, mode="merge")
    assert torch.allclose(model(x), projected, atol=1e-12, rtol=0)
    error = equirelax.equivariance_error(model, x, n_rotations=5)
    assert error.max <= 1e-10
    for module in model.modules():
        assert type(module).__module__.split(".")[0] in ("e3nn", "torch"), type(module)


def test_export_drop_equals_equivariant_part(model):
    handle, x = _trained(model)
    with handle.equivariant():
        expected = model(x)
    equirelax.export(model, mode="drop")
    assert torch.equal(model(x), expected)
    assert equirelax.equivariance_error(model, x).max <= 1e-10


def test_exported_model_pickles_without_equirelax_references(model, tmp_path):
    _trained(model, steps=5)
    equirelax.export(model)
    path = tmp_path / "exported.pt"
    torch.save(model, path)
    assert b"equirelax" not in path.read_bytes()


def test_export_not_inplace_keeps_relaxed_model(model):
    handle, x = _trained(model, steps=5)
    before = model(x)
    exported = equirelax.export(model, inplace=False)
    assert any(isinstance(m, equirelax.RelaxedLayer) for m in model.modules())
    assert torch.equal(model(x), before)
    assert not any(isinstance(m, equirelax.RelaxedLayer) for m in exported.modules())


def test_mlp_branches_are_dropped_with_a_warning(model):
    handle, x = _trained(model, branch="mlp", steps=10)
    with handle.equivariant():
        expected = model(x)
    with pytest.warns(UserWarning, match="could not merge"):
        equirelax.export(model, mode="merge")
    assert torch.allclose(model(x), expected)


def test_tensor_product_layers_relax_and_export():
    tp = o3.FullyConnectedTensorProduct("2x0e+1x1o", "1x0e+1x1o", "1x0e+1x1o")
    x1, x2 = torch.randn(10, 5), torch.randn(10, 4)
    reference = tp(x1, x2)
    with pytest.raises(ValueError, match="container"):
        equirelax.relax(tp, "fixed")
    container = torch.nn.ModuleDict({"tp": tp})
    container.forward = lambda a, b: container["tp"](a, b)
    handle = equirelax.relax(container, "fixed", init="random", init_std=0.3)
    assert handle.layers["tp"].branch_irreps_in.dim == 9
    error = equirelax.equivariance_error(container, (x1, x2), irreps_in=("2x0e+1x1o", "1x0e+1x1o"),
                                         irreps_out="1x0e+1x1o")
    assert error.mean > 1e-3 and error.layers["tp"]["mean"] > 1e-3
    with pytest.warns(UserWarning, match="could not merge"):
        equirelax.export(container)
    assert isinstance(container["tp"], o3.FullyConnectedTensorProduct)
    assert torch.equal(container["tp"](x1, x2), reference)


def test_position_fed_branch_breaks_symmetry_and_needs_positions():
    linear = torch.nn.Sequential(o3.Linear("2x0e+1x1o", "1x0e+1x1o"))
    x, positions = torch.randn(6, 5), torch.randn(6, 3)
    handle = equirelax.relax(linear, "fixed", positions=True, init="random", init_std=0.5)
    with pytest.raises(RuntimeError, match="positions"):
        linear(x)
    handle.set_positions(positions)
    assert linear(x).shape == (6, 4)
    error = equivariance_error_with_positions(linear, x, handle)
    assert error.layers["0"]["mean"] > 1e-3
    with handle.projected():
        projected = linear(x)
        # E(3) projection: a linear map of raw positions is never translation invariant, so it is zero
        handle.set_positions(positions + torch.tensor([3.0, -1.0, 0.5]))
        assert torch.equal(linear(x), projected)
    equirelax.export(linear)
    assert equirelax.equivariance_error(linear, x, irreps_in="2x0e+1x1o", irreps_out="1x0e+1x1o").max < 1e-10
    assert torch.allclose(linear(x), projected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("biases", [True, [True, False]])
def test_biased_linear_merges_and_stays_equivariant(biases):
    model = torch.nn.Sequential(o3.Linear("2x0e+1x1o", "2x0e+1x1o", biases=biases))
    model.irreps_in, model.irreps_out = o3.Irreps("2x0e+1x1o"), o3.Irreps("2x0e+1x1o")
    with torch.no_grad():
        model[0].bias.normal_()  # a trained bias must stay and must not enter the path factors
    handle = equirelax.relax(model, "fixed", init="random", init_std=0.5)
    x = torch.randn(20, 5)
    with handle.projected():
        projected = model(x)
    equirelax.export(model)
    assert isinstance(model[0], o3.Linear)
    assert torch.allclose(model(x), projected, atol=1e-10, rtol=0)
    assert equirelax.equivariance_error(model, x, n_rotations=5).max <= 1e-10


def test_projected_mode_of_an_mlp_branch_is_deterministic_equivariant_and_the_export(model):
    handle, x = _trained(model, branch="mlp", steps=10)
    with handle.projected():
        first, second = model(x), model(x)
        error = equirelax.equivariance_error(model, x, n_rotations=5)
    assert torch.equal(first, second)
    assert error.max <= 1e-6
    with pytest.warns(UserWarning, match="could not merge"):
        equirelax.export(model)
    assert torch.allclose(model(x), first, atol=1e-12, rtol=0)


def equivariance_error_with_positions(model, x, handle):
    return equirelax.equivariance_error(model, x, irreps_in="2x0e+1x1o", irreps_out="1x0e+1x1o")


def test_model_saved_between_recm_probing_steps_loads_with_its_branch_on(model):
    import io
    import pickle

    x, y = make_task("field", 64)
    handle = equirelax.relax(model, "recm", init="random", init_std=0.1, probe_every=2, total_steps=10)
    opt = handle.wrap(torch.optim.SGD(model.parameters(), lr=1e-3))
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()  # the next step is a probing step: the probe maps stand in for the branches' broken part
    assert all(layer.probing for layer in handle.layers.values())
    model.eval()
    reference = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # as MACE saves models (a pickle), here mid-training
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(getattr(m, "probing", False) for m in loaded.modules())
    loaded.train()  # a user running the loaded model in train mode still gets the relaxed model
    assert torch.allclose(loaded(x), reference)
    with handle.equivariant():
        equivariant = model(x)
    assert not torch.allclose(reference, equivariant)
    resumed = equirelax.RelaxHandle.attach(pickle.loads(pickle.dumps(model)))
    assert all(layer.probing for layer in resumed.layers.values())  # RECM's schedule comes back on resume


def test_dense_branches_larger_than_the_model_warn_and_name_lowrank():
    def size_warnings(model, **options):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            equirelax.relax(model, "fixed", **options)
        return [str(w.message) for w in caught if "branches add" in str(w.message)]

    wide = torch.nn.Sequential(o3.Linear("256x0e + 128x1o", "256x0e + 128x1o"))  # 82k weights; dense branch 410k
    assert size_warnings(wide, branch="linear") == []  # under a million branch parameters: no warning
    wider = torch.nn.Sequential(o3.Linear("512x0e + 256x1o", "512x0e + 256x1o"))  # 328k weights; dense 1.6M
    (message,) = size_warnings(wider, branch="linear")
    assert size_warnings(torch.nn.Sequential(o3.Linear("512x0e + 256x1o", "512x0e + 256x1o"))) == []  # low-rank
    assert "branches add 1.6M parameters to a model of 0.3M" in message and "branch='lowrank'" in message


def test_lowrank_is_the_default_and_leaves_the_host_random_stream_alone():
    """The default branch draws its A from a private stream seeded from the host's seed: a relaxed run's data order
    and dropout are the vanilla run's, and the same seed builds the same branches."""
    from equirelax.datasets.synthetic import gated_e3nn_model

    def relaxed(seed):
        torch.manual_seed(seed)
        model = gated_e3nn_model()
        handle = equirelax.relax(model, "ace")
        return model, handle, torch.rand(4)

    torch.manual_seed(7)
    gated_e3nn_model()
    vanilla_draw = torch.rand(4)
    model, handle, draw = relaxed(7)
    assert torch.equal(draw, vanilla_draw)
    kinds = {layer.branch.kind for layer in handle.layers.values()}
    assert kinds == {"lowrank"} and all(layer.branch.rank == 8 for layer in handle.layers.values())
    again, other = relaxed(7)[0], relaxed(8)[0]
    a = [p for n, p in model.named_parameters() if n.endswith("branch.A")]
    assert all(torch.equal(x, y) for x, y in zip(a, [p for n, p in again.named_parameters() if n.endswith("branch.A")]))
    assert not torch.equal(a[0], next(p for n, p in other.named_parameters() if n.endswith("branch.A")))
    layers = [layer.branch.A for layer in handle.layers.values()]
    assert not torch.equal(layers[0][:, :4], layers[1][:, :4])  # each layer its own draw


def test_a_checkpoint_with_another_branch_kind_names_the_setting():
    from equirelax.datasets.synthetic import gated_e3nn_model

    dense = gated_e3nn_model()
    equirelax.relax(dense, "ace", branch="linear")
    default = gated_e3nn_model()
    equirelax.relax(default, "ace")
    with pytest.raises(ValueError, match="saved with a linear branch but this model builds a lowrank branch; set "
                                         "branch: linear"):
        default.load_state_dict(dense.state_dict())
    again = gated_e3nn_model()
    equirelax.relax(again, "ace", branch="linear")
    again.load_state_dict(dense.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), dense.state_dict().values()))


@pytest.mark.parametrize("blockwise", [True, False])
@pytest.mark.parametrize("branch", ["linear", "lowrank"])
def test_a_recm_probing_step_computes_the_dense_formula(branch, blockwise, monkeypatch):
    """f_eq(x) + γ·P(W)x + c·P⊥(V)x, V_a on the first half of the rows and V_b on the rest, c = rms(f_eq(x)) /
    rms(x), with the probe sums and the probe maps' gradients (on the leaves RECM reads), whether the maps are
    applied densely or through their rank (large layers)."""
    from equirelax.core.layer import RelaxedLayer

    monkeypatch.setattr(RelaxedLayer, "BLOCKWISE_PROBE_ENTRIES", 0 if blockwise else 10**9)
    torch.manual_seed(0)
    model = torch.nn.Sequential(o3.Linear("8x0e+4x1o+2x2e", "6x0e+3x1o+2x2e+1x1e").to(torch.float64))
    equirelax.relax(model, "recm", branch=branch, total_steps=100)
    layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
    with torch.no_grad():
        layer.probe_B.normal_()
        layer.gamma.fill_(0.7)
        for p in layer.branch.parameters():
            p.normal_()
    x = torch.randn(10, 7, 30, dtype=torch.float64)
    layer.probing = True
    probed = layer(x)
    grads = torch.autograd.grad(probed.pow(2).sum(), layer.probe_leaves)
    rows = x.reshape(-1, 30)
    A, B = (t.detach().requires_grad_() for t in (layer.probe_A, layer.probe_B))
    V = B @ A
    off = V - layer.projector(V)
    scale = (layer.base(x).pow(2).mean() / x.pow(2).mean()).sqrt().detach()
    first, second = scale * rows @ off[0].T, scale * rows @ off[1].T
    expected = layer.base(x) + torch.cat([first[:35], second[35:]]).reshape(10, 7, -1) \
        + 0.7 * x @ layer.projector(layer.branch.weight.detach()).T
    assert torch.allclose(probed, expected, atol=1e-12)
    assert float(layer.probe_sums[0]) == pytest.approx(float((first * second).sum().detach()), rel=1e-12)
    assert float(layer.probe_sums[1]) == pytest.approx(float((first - second).pow(2).sum().detach() / 2), rel=1e-12)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (A, B))
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(grads, expected_grads))


def _frozen_evaluation(model, x):
    """A host's evaluation in train mode with gradients on (forces) and every parameter frozen, as MACE validates;
    the parameters' flags are restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return model(x.requires_grad_())
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_cr_regularises_only_the_rows_of_training_forwards():
    """CR's regulariser is taken over the rows the step trained on. A host's evaluation in train mode with its
    parameters frozen (MACE validates so, at every epoch's end and before the first step) adds none: before,
    the first step after a validation also regularised every validation row."""
    from equirelax.core.layer import RelaxedLayer

    torch.manual_seed(0)
    x_train, x_valid = torch.randn(16, 20, dtype=torch.float64), torch.randn(40, 20, dtype=torch.float64)
    values, grads = [], []
    for validate in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(o3.Linear("8x0e+4x1o", "6x0e+3x1o").to(torch.float64))
        handle = equirelax.relax(model, "cr", schedule="constant", init="random")
        layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
        optimizer = handle.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
        if validate:
            _frozen_evaluation(model, x_valid)
            assert layer.cached_inputs == []
        model(x_train).pow(2).sum().backward()
        assert sum(c.shape[0] for c in layer.cached_inputs) == 16
        optimizer.step()
        values.append(float(handle.controller.last_regulariser))
        grads.append(layer.branch.A.grad.clone())
    assert values[0] > 0 and values[1] == values[0]
    assert torch.equal(grads[1], grads[0])


def test_the_symmetry_map_reads_the_last_training_rows_not_a_frozen_evaluation():
    """``breaking`` is measured on rows of the last training forward; a host's evaluation in train mode with its
    parameters frozen (MACE validates so, then logs the map) leaves it as it was."""
    from equirelax.core.layer import SAMPLE_ROWS, RelaxedLayer

    torch.manual_seed(0)
    model = torch.nn.Sequential(o3.Linear("8x0e+4x1o", "6x0e+3x1o").to(torch.float64))
    handle = equirelax.relax(model, "fixed", init="random")
    layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
    x_train, x_valid = torch.randn(16, 20, dtype=torch.float64), 5 * torch.randn(40, 20, dtype=torch.float64)
    model(x_train).pow(2).sum().backward()
    rows = x_train[:SAMPLE_ROWS]
    expected = layer.breaking(rows, layer.base(rows).detach())
    assert handle.breaking() == {next(iter(handle.layers)): expected} and expected > 0
    _frozen_evaluation(model, x_valid)
    assert layer.breaking() == expected


def test_recm_probes_only_training_forwards():
    """On a probing step, a forward under no_grad, or a host's evaluation in train mode with the parameters frozen
    (MACE validates so, between two training steps), is the relaxed model: the probe maps stand in for no
    branch, and nothing is recorded for RECM. Before, such a forward on a probing step probed every row."""
    from equirelax.core.layer import RelaxedLayer

    torch.manual_seed(0)
    model = torch.nn.Sequential(o3.Linear("8x0e+4x1o", "6x0e+3x1o").to(torch.float64))
    equirelax.relax(model, "recm", total_steps=100)
    layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
    with torch.no_grad():
        layer.probe_B.normal_()
        layer.gamma.fill_(0.7)
    x = torch.randn(40, 20, dtype=torch.float64)
    layer.probing = True
    relaxed = layer.base(x) + 0.7 * layer.branch(x)
    assert not torch.allclose(model(x), relaxed)  # a training forward probes
    layer.probe_sums = layer.probe_leaves = None
    with torch.no_grad():
        assert torch.allclose(model(x), relaxed, atol=1e-12)
    assert torch.allclose(_frozen_evaluation(model, x), relaxed, atol=1e-12)
    assert layer.probe_sums is None and layer.probe_leaves is None
    assert layer.sample_sides == ()  # RECM's split hook gave it no samples' sides for that forward either
