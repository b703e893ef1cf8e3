"""Unconstrained branches f_neq added next to a host layer."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("zero", "random")


def _check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(
            f"equirelax: unknown branch init {init!r}; choose 'zero' (output unchanged at step 0, for "
            f"pretrained models) or 'random' (small random weights, as in the papers, for training from scratch)"
        )
    return init


class LinearBranch(nn.Module):
    """Dense map on the flattened feature vector: every irrep mixed with every other."""

    kind = "linear"

    def __init__(self, dim_in: int, dim_out: int, init: str = "zero", init_std: float = 1e-2):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        if _check_init(init) == "zero":
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}"


class MLPBranch(nn.Module):
    """Two-layer GELU MLP with a hidden width of twice the input dimension."""

    kind = "mlp"

    def __init__(self, dim_in: int, dim_out: int, init: str = "zero", init_std: float = 1e-2):
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        hidden = 2 * dim_in
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)
        nn.init.normal_(self.fc1.weight, std=1.0 / math.sqrt(dim_in))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)
        # only the last layer decides whether the branch starts silent
        if _check_init(init) == "zero":
            nn.init.zeros_(self.fc2.weight)
        else:
            nn.init.normal_(self.fc2.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LowRankBranch(nn.Module):
    """Linear map of rank ``rank``: W = B·A, applied as x → A x → B(A x).

    Still a linear branch (projection and merge use the dense ``weight``), at a
    cost of rank·(dim_in + dim_out) per row instead of dim_in·dim_out. With
    ``init="zero"`` B starts at zero (A random), as in LoRA. A is drawn from ``generator``
    when given, so that relaxing a model leaves the host's random stream (data order,
    dropout) as it was.
    """

    kind = "lowrank"

    def __init__(self, dim_in: int, dim_out: int, init: str = "zero", init_std: float = 1e-2, rank: int = 8,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"equirelax: lowrank branch 'rank' must be a positive integer, got {rank!r}")
        self.dim_in, self.dim_out, self.rank = dim_in, dim_out, rank
        self.A = nn.Parameter(torch.randn(rank, dim_in, generator=generator) / math.sqrt(dim_in))
        self.B = nn.Parameter(torch.empty(dim_out, rank))
        if _check_init(init) == "zero":
            nn.init.zeros_(self.B)
        else:
            nn.init.normal_(self.B, std=init_std)

    @property
    def weight(self) -> torch.Tensor:
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.A), self.B)

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, dim_out={self.dim_out}, rank={self.rank}"


BRANCHES = {"linear": LinearBranch, "lowrank": LowRankBranch, "mlp": MLPBranch}
# each kind's parameter names in a state dict (under the layer's ``branch.``)
PARAMETER_NAMES = {"linear": {"weight"}, "lowrank": {"A", "B"}, "mlp": {"fc1.weight", "fc1.bias", "fc2.weight",
                                                                      "fc2.bias"}}


def saved_branch_kind(names) -> str | None:
    """The branch kind a saved branch's parameter names (``{"A", "B"}``, ...) show; None: none of them."""
    names = set(names)
    if "A" in names:
        return "lowrank"
    if "fc1.weight" in names:
        return "mlp"
    return "linear" if "weight" in names else None
LINEAR_KINDS = (LinearBranch, LowRankBranch)  # branches that are linear maps: closed-form projection and merge


def make_branch(kind: str, dim_in: int, dim_out: int, init: str = "zero", init_std: float = 1e-2,
                generator: torch.Generator | None = None, **options) -> nn.Module:
    if kind not in BRANCHES:
        raise ValueError(f"equirelax: unknown branch kind {kind!r}; choose one of {sorted(BRANCHES)}")
    if options and kind != "lowrank":
        raise ValueError(f"equirelax: branch {kind!r} takes no options, got {sorted(options)}")
    if kind == "lowrank":
        options["generator"] = generator
    return BRANCHES[kind](dim_in, dim_out, init=init, init_std=init_std, **options)
