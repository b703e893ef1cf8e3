"""RECM: levels bounded by the measured symmetry gap, its probe maps and probing schedule, the noise allowance,
and checkpoints from earlier versions."""

import copy
import functools
import statistics

import pytest
import torch

import equirelax
from equirelax.core import hookimpl
from equirelax.core.samples import remove_sample_split
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


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
