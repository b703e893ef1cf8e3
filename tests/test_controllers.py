"""Every controller: state round trips (resume, a handle re-attached to a copied model)."""

import copy

import pytest
import torch

import equirelax
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


@pytest.mark.parametrize(
    "controller,options",
    [("cr", {"epochs": 6}), ("cr", {"epochs": 8, "total_steps": 40}), ("ace", {"total_steps": 40}),
     ("ace-resilient", {"total_steps": 40}), ("recm", {"probe_every": 3, "total_steps": 40}),
     ("recm", {"allowance": "rows", "total_steps": 40}), ("fixed", {})],
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
