"""On a GPU: every controller trains a relaxed model on CUDA, keeps its state there, and exports an equivariant
model equal to its CPU twin. Skipped where no CUDA device is present."""

import copy

import pytest
import torch

import equirelax
from equirelax.datasets.synthetic import make_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONTROLLERS = [("fixed", {}), ("cr", {"epochs": 2}), ("ace", {}), ("ace-resilient", {}), ("recm", {})]


def _run(model, controller, options, branch, device, x, y, steps=8):
    model = model.to(device)
    torch.manual_seed(1)   # branches are drawn on the CPU: the same on both devices
    handle = equirelax.relax(model, controller, branch=branch, init="random", total_steps=steps, **options)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))
    x, y = x.to(device), y.to(device)
    for step in range(steps):
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
        if (step + 1) % 4 == 0:
            handle.epoch_end()
    return handle


@pytest.mark.parametrize("controller,options", CONTROLLERS)
@pytest.mark.parametrize("branch", ["lowrank", "mlp"])
def test_a_controller_trains_on_cuda_as_on_the_cpu_and_exports_equivariant(model, controller, options, branch):
    x, y = make_task("field", 64, seed=0)
    gpu_model, cpu_model = copy.deepcopy(model), copy.deepcopy(model)
    gpu = _run(gpu_model, controller, options, branch, "cuda", x, y)
    cpu = _run(cpu_model, controller, options, branch, "cpu", x, y)
    # the controllers' state lives with the model
    for name, buffer in gpu_model.named_buffers():
        assert buffer.device.type == "cuda", name
    # float64 on both devices: the same run to round-off
    assert gpu.levels() == pytest.approx(cpu.levels(), abs=1e-6)
    assert torch.allclose(gpu_model(x.cuda()).cpu(), cpu_model(x), atol=1e-6)
    equirelax.export(gpu_model, mode="merge" if branch == "lowrank" else "drop")
    error = equirelax.equivariance_error(gpu_model, x.cuda(), n_rotations=3)
    assert error.max <= 1e-10
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
