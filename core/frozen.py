"""A relaxed layer frozen for deployment: ``base(x) + γ·branch(x)`` in plain torch, TorchScript-able.

``export(model, mode="freeze")`` swaps each :class:`RelaxedLayer` for one of these.
The branch becomes ordinary ``torch.nn`` modules (``Linear``, ``Sequential``,
``GELU``) and γ a buffer; no controller state, probes, caches or hooks remain,
and the host layer is kept as is. The classes carry e3nn's ``compile_mode("script")``
so a host that compiles with e3nn (MACE, SevenNet's deploy) scripts them with
the rest of the model: the compiled file then runs where equirelax is not installed.
This module imports only torch and e3nn so that packagers (``torch.package``) can
carry it inside a model file.
"""

import copy
from typing import Optional

import torch
from e3nn.util.jit import compile_mode
from torch import nn


class LowRankMap(nn.Module):
    """x → B(A x), the frozen form of a low-rank branch (same parameter names)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.A), self.B)


class MLPMap(nn.Module):
    """fc2(GELU(fc1(x))), the frozen form of an MLP branch (same parameter names)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = copy.deepcopy(fc1), nn.GELU(), copy.deepcopy(fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _plain_branch(branch: nn.Module) -> nn.Module:
    """The branch as plain torch modules with the same outputs and the same state-dict keys."""
    kind = getattr(branch, "kind", None)
    if kind == "linear":
        linear = nn.Linear(branch.dim_in, branch.dim_out, bias=False).to(branch.weight)
        with torch.no_grad():
            linear.weight.copy_(branch.weight)
        return linear
    if kind == "lowrank":
        return LowRankMap(branch.A, branch.B)
    if kind == "mlp":
        return MLPMap(branch.fc1, branch.fc2)
    raise TypeError(f"equirelax: cannot freeze a branch of type {type(branch).__name__}")


class _Frozen(nn.Module):
    """Shared by the frozen layers: state dicts of the relaxed layer load into them (its base, branch and γ keys
    are the same; controller state ``ctrl_*`` and RECM probes ``probe_*`` are training-only and skipped)."""

    IRREPS: tuple = ()  # the host layer's irreps attributes, copied: host code may inspect its layers

    def __init__(self, base: nn.Module, branch: nn.Module, gamma: torch.Tensor):
        super().__init__()
        self.base = base
        self.branch = branch
        self.register_buffer("gamma", gamma.detach().clone())
        for name in self.IRREPS:
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix + "ctrl_") or k.startswith(prefix + "probe_")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@compile_mode("script")
class FrozenRelaxedLinear(_Frozen):
    """``base(x) + γ·branch(x)`` for a host layer called with its features alone (e3nn ``o3.Linear`` and kin)."""

    IRREPS = ("irreps_in", "irreps_out")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.base(features) + self.gamma.to(features.dtype) * self.branch(features)


@compile_mode("script")
class FrozenRelaxedPair(_Frozen):
    """``base(x1, x2, weight) + γ·branch([x1, x2])`` for a tensor product (branch fed both inputs, broadcast)."""

    IRREPS = ("irreps_in1", "irreps_in2", "irreps_out")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.base(x1, x2, weight)
        shape = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1])
        rows = torch.cat([x1.expand(shape + (x1.shape[-1],)), x2.expand(shape + (x2.shape[-1],))], dim=-1)
        return out + self.gamma.to(out.dtype) * self.branch(rows)


def freeze_layer(layer) -> nn.Module:
    """The deployable form of a :class:`~equirelax.core.layer.RelaxedLayer`, as it computes in relaxed mode."""
    if layer.uses_positions:
        raise ValueError(
            "equirelax: a branch fed raw positions cannot be frozen for deployment (the positions are handed to it "
            "by the training loop, not by the host model); export with mode='merge' or 'drop' instead"
        )
    if getattr(layer, "probe_A", None) is not None and layer.probing:
        raise RuntimeError("equirelax: cannot freeze a layer in the middle of a RECM probing step")
    branch = _plain_branch(layer.branch)
    if layer.branch_args == (0,):
        return FrozenRelaxedLinear(layer.base, branch, layer.gamma)
    if layer.branch_args == (0, 1):
        return FrozenRelaxedPair(layer.base, branch, layer.gamma)
    raise ValueError(
        f"equirelax: cannot freeze a layer whose branch reads arguments {layer.branch_args}; export with "
        f"mode='merge' or 'drop' instead"
    )
