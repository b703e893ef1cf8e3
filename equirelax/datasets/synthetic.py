"""Small generated e3nn regression tasks: exactly symmetric, or with a uniform external field.

Inputs are Gaussian in e3nn irreps (a rotation-invariant distribution); the
target is a fixed random equivariant network ("teacher"). The ``field`` variant
adds ``F · (cᵀ x_scalars)`` to the vector output: a fixed direction F that
survives only rotations about F, as a uniform external field does.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..core._e3nn import o3

IRREPS_IN = "4x0e+4x1o"
IRREPS_HIDDEN = "8x0e+8x1o"
IRREPS_OUT = "1x0e+1x1o"


def gated_e3nn_model(irreps_in=IRREPS_IN, irreps_out=IRREPS_OUT, hidden_mul: int = 8) -> nn.Sequential:
    """``Linear → Gate → Linear``, built from e3nn parts only."""
    from e3nn.nn import Gate  # noqa: PLC0415  (equirelax.core._e3nn has already imported e3nn safely)

    gate = Gate(
        f"{hidden_mul}x0e", [nn.functional.silu], f"{hidden_mul}x0e", [torch.sigmoid], f"{hidden_mul}x1o"
    )
    model = nn.Sequential(o3.Linear(irreps_in, gate.irreps_in), gate, o3.Linear(gate.irreps_out, irreps_out))
    model.irreps_in = o3.Irreps(irreps_in)
    model.irreps_out = o3.Irreps(irreps_out)
    return model


@functools.lru_cache(maxsize=4)
def _teacher(dtype) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return gated_e3nn_model().to(dtype)


def make_task(kind: str = "symmetric", n: int = 512, *, seed: int = 0, field_strength: float = 1.0,
              dtype=None):
    """``(x, y)`` with ``x: [n, dim(IRREPS_IN)]`` and ``y: [n, dim(IRREPS_OUT)]``."""
    if kind not in ("symmetric", "field"):
        raise ValueError(f"equirelax: unknown synthetic task {kind!r}; choose 'symmetric' or 'field'")
    dtype = dtype or torch.get_default_dtype()
    generator = torch.Generator().manual_seed(seed)
    irreps_in = o3.Irreps(IRREPS_IN)
    x = torch.randn(n, irreps_in.dim, generator=generator, dtype=dtype)
    teacher = _teacher(dtype)
    with torch.no_grad():
        y = teacher(x)
    if kind == "field":
        direction = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)  # e3nn (y, z, x) basis: the z axis
        scalars = x[:, : irreps_in.count("0e")]
        coupling = torch.linspace(1.0, 0.5, scalars.shape[1], dtype=dtype) / scalars.shape[1] ** 0.5
        y = y.clone()
        y[:, 1:4] += field_strength * (scalars @ coupling)[:, None] * direction
    return x, y
