"""export(mode="freeze"): the relaxed model, γ and branches kept, compiled and run where equirelax is not installed."""

import subprocess
import sys
import warnings

import pytest
import torch

import equirelax
from equirelax.core._e3nn import o3
from equirelax.datasets.synthetic import IRREPS_IN, gated_e3nn_model

def _compile(model):
    from e3nn.util import jit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TorchScript's notes on e3nn's annotations
        return torch.jit.script(jit.compile(model))  # e3nn compiles the children, TorchScript the rest


def _relaxed(branch):
    model = gated_e3nn_model()
    options = {"rank": 3} if branch == "lowrank" else {}
    equirelax.relax(model, "fixed", branch=branch, init="random", init_std=0.3, **options)
    return model


@pytest.mark.parametrize("branch", ["linear", "lowrank", "mlp"])
def test_frozen_model_equals_relaxed_and_holds_only_plain_modules(branch):
    model = _relaxed(branch)
    x = torch.randn(16, o3.Irreps(IRREPS_IN).dim)
    expected = model(x)
    assert equirelax.equivariance_error(model, x).mean > 1e-3  # it is relaxed: γ and the branch act
    frozen = equirelax.export(model, mode="freeze", inplace=False)
    assert torch.allclose(frozen(x), expected, atol=1e-12, rtol=0)
    kinds = {type(m).__module__ for m in frozen.modules()}
    assert {k for k in kinds if k.startswith("equirelax")} == {"equirelax.core.frozen"}
    assert not any(isinstance(m, equirelax.RelaxedLayer) for m in frozen.modules())
    gammas = [float(m.gamma) for m in frozen.modules() if type(m).__name__.startswith("FrozenRelaxed")]
    assert gammas == [1.0, 1.0]  # γ is an ordinary buffer a user can read
    assert any(isinstance(m, equirelax.RelaxedLayer) for m in model.modules())  # inplace=False kept it


@pytest.mark.parametrize("branch", ["linear", "lowrank", "mlp"])
def test_compiled_frozen_model_runs_without_equirelax(branch, tmp_path, not_installed):
    model = _relaxed(branch)
    x = torch.randn(16, o3.Irreps(IRREPS_IN).dim)
    expected = model(x).detach()
    compiled = _compile(equirelax.export(model, mode="freeze"))
    assert torch.allclose(compiled(x), expected, atol=1e-12, rtol=0)
    torch.jit.save(compiled, tmp_path / "model.pt")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = not_installed + """
import torch
model = torch.jit.load("model.pt")
io = torch.load("io.pt")
print("DIFF", float((model(io["x"]) - io["expected"]).abs().max()))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("DIFF")[1]) <= 1e-12


def test_frozen_tensor_product_scripts_and_equals_relaxed():
    container = torch.nn.ModuleDict({"tp": o3.FullyConnectedTensorProduct("2x0e+1x1o", "1x0e+1x1o", "1x0e+1x1o")})
    container.forward = lambda a, b: container["tp"](a, b)
    equirelax.relax(container, "fixed", init="random", init_std=0.3)
    x1, x2 = torch.randn(10, 5), torch.randn(1, 4)  # broadcast, as the relaxed layer allows
    expected = container["tp"](x1, x2)
    frozen = equirelax.export(container, mode="freeze")["tp"]
    assert torch.allclose(frozen(x1, x2), expected, atol=1e-12, rtol=0)
    assert torch.allclose(_compile(frozen)(x1, x2), expected, atol=1e-12, rtol=0)


def test_position_fed_branch_cannot_be_frozen_and_says_what_to_do():
    model = torch.nn.Sequential(o3.Linear("2x0e+1x1o", "1x0e+1x1o"))
    equirelax.relax(model, "fixed", positions=True, init="random")
    with pytest.raises(ValueError, match="raw positions.*mode='merge'"):
        equirelax.export(model, mode="freeze")


def test_unknown_export_mode_lists_freeze():
    model = _relaxed("linear")
    with pytest.raises(ValueError, match="freeze"):
        equirelax.export(model, mode="keep")
