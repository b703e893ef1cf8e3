"""The per-step controller path never reads a tensor back to the host (no .item(), bool(), float(), .cpu())."""

import contextlib

import pytest
import torch

import equirelax
from equirelax.datasets.synthetic import gated_e3nn_model, make_task

SYNCING = ("item", "__bool__", "__float__", "__int__", "cpu", "tolist", "numpy")


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host-device sync: Tensor.{name}() in the per-step path")

        return method

    with monkeypatch.context() as patch:
        for name in SYNCING:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


@pytest.mark.parametrize(
    "controller,options",
    [("fixed", {}), ("cr", {"epochs": 3}), ("ace", {}), ("ace-resilient", {}),
     ("recm", {"probe_every": 2}), ("recm", {"probe_every": 2, "allowance": "rows"})],
)
@pytest.mark.parametrize("branch", ["linear", "lowrank", "mlp"])
def test_per_step_path_has_no_host_sync(monkeypatch, controller, options, branch):
    if branch == "lowrank":  # through the large layers' paths (RECM's probes, ACE-resilient's gradient read)
        from equirelax.core.layer import RelaxedLayer

        monkeypatch.setattr(RelaxedLayer, "BLOCKWISE_PROBE_ENTRIES", 0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, controller, branch=branch, total_steps=4, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # not wrapped: the hooks are called by hand below
    x, y = make_task("field", 32)
    gammas = []
    for _ in range(4):
        opt.zero_grad()
        with forbid_host_reads(monkeypatch):
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            handle.after_backward()
        opt.step()
        with forbid_host_reads(monkeypatch):
            handle.after_step()
        gammas.append(handle.levels())
    # the controller did run: its state moved (except for the constant baseline and CR within an epoch)
    if controller in ("ace", "ace-resilient", "recm"):
        assert gammas[0] != gammas[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("controller,options", [("cr", {"epochs": 3}), ("ace", {}), ("ace-resilient", {}),
                                                ("recm", {"probe_every": 2}),
                                                ("recm", {"probe_every": 2, "allowance": "rows"})])
def test_per_step_path_has_no_cuda_sync(controller, options):
    """On a GPU, CUDA's own sync detector: any synchronising call in the controller's per-step path raises."""
    model = gated_e3nn_model(hidden_mul=24).cuda()  # a 120-wide layer: RECM's rows keep a sketch of its moments
    handle = equirelax.relax(model, controller, total_steps=4, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = (t.cuda() for t in make_task("field", 32))
    for _ in range(4):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle.after_backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle.after_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
