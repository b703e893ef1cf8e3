"""Bad input gets a clear error; controllers and other plugins plug in through pluggy and entry points."""

import pytest
import torch

import equirelax
from equirelax.core import Controller, hookimpl
from equirelax.core._e3nn import o3
from equirelax.core.controllers import available_controllers
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


def test_unknown_controller(model):
    with pytest.raises(ValueError, match="unknown controller 'acme'.*available"):
        equirelax.relax(model, "acme")


def test_unknown_controller_option(model):
    with pytest.raises(TypeError, match="unknown option.*'dual_lrr'"):
        equirelax.relax(model, "ace", dual_lrr=0.1)


@pytest.mark.parametrize(
    "controller,options,message",
    [
        ("cr", {}, "needs 'epochs'"),
        ("cr", {"schedule": "cosine", "epochs": 3}, "schedule"),
        ("ace", {"dual_lr": -1.0}, "dual_lr"),
        ("ace", {"form": "strict"}, "form"),
        ("ace", {"dual": "adam"}, "dual"),
        ("cr", {"epochs": 3, "regulariser": "l2"}, "regulariser"),
        ("cr", {"epochs": 3, "granularity": "batch"}, "granularity"),
        ("recm", {"tau": -1.0}, "tau"),
        ("recm", {"probe_every": 1}, "probe_every"),
        ("recm", {"probe_every_saturated": 2}, r"'probe_every_saturated' must be an integer >= probe_every \(4\)"),
        ("recm", {"probe_every_saturated": 8.0}, "probe_every_saturated"),
        ("recm", {"gamma0": 2.0}, "gamma0"),
        ("recm", {"warmup": 1.5}, "warmup"),
        ("recm", {"warmup": -0.1}, "warmup"),
        ("recm", {"probe_lr": 0.0}, "probe_lr"),
        ("recm", {"probe_limit": -1.0}, "probe_limit"),
        ("recm", {"allowance": "moments"}, r"'allowance' must be one of \('maps', 'rows'\)"),
    ],
)
def test_bad_controller_options(model, controller, options, message):
    with pytest.raises(ValueError, match=message):
        equirelax.relax(model, controller, **options)


def test_target_matching_nothing_lists_relaxable_layers(model):
    with pytest.raises(ValueError, match=r"matched no relaxable layer.*\['0', '1.mul', '2'\]"):
        equirelax.relax(model, "ace", targets="interactions.*")


def test_target_without_irreps_information():
    model = torch.nn.Sequential(o3.Linear("1x0e", "1x0e"), torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"layer '1' \(Linear\) has no irreps information"):
        equirelax.relax(model, "ace", targets="1")
    with pytest.raises(ValueError, match="Linear have no irreps information"):
        equirelax.relax(model, "ace", targets=torch.nn.Linear)


def test_model_without_e3nn_layers():
    with pytest.raises(ValueError, match="no adapter recognises a Sequential"):
        equirelax.relax(torch.nn.Sequential(torch.nn.Linear(3, 3)), "ace")


@pytest.mark.parametrize(
    "kwargs,message",
    [({"branch": "transformer"}, "unknown branch kind"), ({"init": "xavier"}, "unknown branch init"),
     ({"group": "SE3"}, "unknown symmetry group"), ({"on_nonfinite": "ignore"}, "on_nonfinite"),
     ({"branch": "lowrank", "rank": 0}, "'rank' must be a positive integer"),
     ({"branch": "mlp", "rank": 4}, "takes no options")],
)
def test_bad_relax_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        equirelax.relax(model, "fixed", **kwargs)


def test_relaxing_twice_and_exporting_unrelaxed(model):
    equirelax.relax(model, "fixed")
    with pytest.raises(ValueError, match="already relaxed"):
        equirelax.relax(model, "fixed")
    with pytest.raises(ValueError, match="unknown export mode"):
        equirelax.export(model, mode="squash")
    with pytest.raises(ValueError, match="no relaxed layer"):
        equirelax.export(gated_e3nn_model())


def _nan_step(model, handle, opt):
    x, y = make_task("field", 32)
    opt.zero_grad()
    (model(x) - y).pow(2).mean().mul(float("nan")).backward()
    opt.step()


@pytest.mark.parametrize("controller", ["ace", "ace-resilient", "recm"])
def test_nan_loss_is_skipped_by_the_controller_and_reported(model, controller, train_loop):
    x, y = make_task("field", 128)
    handle = equirelax.relax(model, controller, total_steps=10, **({"probe_every": 2} if controller == "recm" else {}))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    handle.wrap(opt)
    train_loop(model, handle, x, y, steps=4, optimizer=opt)
    before = {k: v.clone() for k, v in handle.state_dict()["layer_state"]["0"].items() if k != "ctrl_nonfinite"}
    _nan_step(model, handle, opt)
    after = handle.state_dict()["layer_state"]["0"]
    for key, value in before.items():
        if key not in ("gamma", "ctrl_steps", "ctrl_step"):  # γ is a host parameter for ACE; steps count steps
            assert torch.equal(after[key], value), key
    assert all(torch.isfinite(v).all() for k, v in after.items() if k != "gamma")
    with pytest.warns(RuntimeWarning, match="1 training step.*non-finite"):
        handle.epoch_end()
    assert handle.metrics()["nonfinite_steps"] == 1


def test_nan_loss_raises_when_asked(model):
    handle = equirelax.relax(model, "ace", on_nonfinite="raise")
    opt = handle.wrap(torch.optim.SGD(model.parameters(), lr=1e-3))
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient"):
        _nan_step(model, handle, opt)


def test_incompatible_state_names_the_difference(model):
    handle = equirelax.relax(model, "ace")
    other = gated_e3nn_model()
    other_handle = equirelax.relax(other, "recm", targets="2")
    with pytest.raises(ValueError, match="controller: checkpoint has 'ace', this model has 'recm'.*layers"):
        other_handle.load_state_dict(handle.state_dict())
    with pytest.raises(ValueError, match="not an equirelax controller state"):
        handle.load_state_dict({"gamma": 1.0})


def test_wrap_adds_missing_parameters_and_is_idempotent(model):
    opt = torch.optim.Adam(model.parameters(), 1e-3)  # created before relax: no branch parameters
    handle = equirelax.relax(model, "ace")
    handle.wrap(opt)
    handle.wrap(opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in handle.parameters())
    assert len(opt.param_groups) == 2


# ------------------------------------------------------------------ plugins
class Halving(Controller):
    """A third-party controller: halves every γ at each epoch end."""

    name = "halving"
    defaults = {"factor": 0.5}

    @hookimpl
    def equirelax_epoch_end(self, handle, epoch):
        for layer in self.layers.values():
            layer.gamma.mul_(self.options["factor"])


def test_custom_controller_class_drives_levels(model):
    handle = equirelax.relax(model, Halving, factor=0.25)
    handle.epoch_end()
    handle.epoch_end()
    assert handle.levels() == {"0": 0.0625, "2": 0.0625}


def test_builtin_controllers_are_registered_as_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="equirelax.controllers")}
    assert {"fixed", "cr", "ace", "recm"} <= names
    assert {"fixed", "cr", "ace", "ace-resilient", "recm"} <= set(available_controllers())
    for ep in entry_points(group="equirelax.controllers"):
        assert issubclass(ep.load(), Controller)


def test_entry_point_controller_is_found(model, monkeypatch):
    import importlib.metadata as metadata

    ep = metadata.EntryPoint(name="halving", value=f"{__name__}:Halving", group="equirelax.controllers")
    import sys

    sys.modules.setdefault(__name__, sys.modules[Halving.__module__])
    original = metadata.entry_points

    def fake(**kwargs):
        found = list(original(**kwargs))
        return found + [ep] if kwargs.get("group") == "equirelax.controllers" else found

    monkeypatch.setattr("equirelax.core.controllers.entry_points", fake)
    handle = equirelax.relax(model, "halving")
    handle.epoch_end()
    assert handle.levels()["0"] == 0.5


def test_metrics_plugin_sees_every_hook(model, train_loop):
    calls = []

    class Logger:
        @hookimpl
        def equirelax_after_backward(self, handle, finite):
            calls.append("backward")

        @hookimpl
        def equirelax_after_optimizer_step(self, handle, finite):
            calls.append("step")

        @hookimpl
        def equirelax_epoch_end(self, handle, epoch):
            calls.append(f"epoch{epoch}")

        @hookimpl
        def equirelax_metrics(self, handle):
            return {"logger/calls": len(calls)}

    x, y = make_task("symmetric", 64)
    handle = equirelax.relax(model, "ace", total_steps=2)
    handle.plugins.register(Logger())
    train_loop(model, handle, x, y, steps=2)
    handle.epoch_end()
    assert calls == ["backward", "step", "backward", "step", "epoch1"]
    metrics = handle.metrics()
    assert metrics["logger/calls"] == 5 and "ace/lambda/0" in metrics and "gamma/2" in metrics


def _forward_without_positions(model):
    equirelax.relax(model, "fixed", positions=True)
    model(torch.randn(4, model.irreps_in.dim))


def _forward_with_wrong_positions(model):
    handle = equirelax.relax(model, "fixed", positions=True)
    handle.set_positions(torch.randn(3, 3))
    model(torch.randn(4, model.irreps_in.dim))


def _schedule_longer_than_training(model):
    from equirelax.core.controllers import check_schedule_fits

    check_schedule_fits(50, 10, "MACE", "max_num_epochs")


BAD_INPUT = {
    "unknown controller": (lambda m: equirelax.relax(m, "acme"), "unknown controller 'acme'"),
    "negative dual learning rate": (lambda m: equirelax.relax(m, "ace", dual_lr=-0.1), "'dual_lr' must be"),
    "negative RECM horizon": (lambda m: equirelax.relax(m, "recm", horizon=-0.1), "'horizon' must be a number > 0"),
    "schedule longer than training": (_schedule_longer_than_training, "runs over 50 epochs but MACE stops after"),
    "targets matching nothing": (lambda m: equirelax.relax(m, "ace", targets=["nothing.*"]),
                                 "matched no relaxable layer"),
    "branch kind unknown": (lambda m: equirelax.relax(m, "ace", branch="transformer"), "unknown branch kind"),
    "positions not given to a position-fed branch": (_forward_without_positions,
                                                     "fed raw positions, but none were given"),
    "positions not matching the features": (_forward_with_wrong_positions, "do not match this layer's features"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_table(model, case):
    """Every bad input stops with an equirelax error that names the problem."""
    action, message = BAD_INPUT[case]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as error:
        action(model)
    assert str(error.value).startswith("equirelax:"), str(error.value)
    assert message in str(error.value), str(error.value)
