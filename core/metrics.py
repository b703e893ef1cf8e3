"""Equivariance error, end to end and per relaxed layer.

err(f) = mean_g [ mean_x ‖f(ρ_in(g)x) − ρ_out(g)f(x)‖ / mean_x ‖f(x)‖ ], with g
Haar-random (O(3) by default: rotations and inversions); the max over g is
reported too. Rotations and representation matrices come from e3nn.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ._e3nn import o3
from .irreps import as_irreps, random_rotations, wigner_D


@dataclass
class EquivarianceError:
    mean: float
    max: float
    layers: dict = field(default_factory=dict)  # name -> {"mean": ..., "max": ...}

    def as_dict(self) -> dict:
        return {"mean": self.mean, "max": self.max, "layers": self.layers}


def _as_tuple(value):
    # an e3nn Irreps is itself a tuple: it names one tensor, not several
    if isinstance(value, (tuple, list)) and not isinstance(value, o3.Irreps):
        return tuple(value)
    return (value,)


def _rotate(tensors, irreps, R):
    rotated = []
    for tensor, ir in zip(tensors, irreps):
        if ir is None or not torch.is_tensor(tensor):
            rotated.append(tensor)
        else:
            D = wigner_D(ir, R).to(dtype=tensor.dtype, device=tensor.device)
            rotated.append(tensor @ D.T)
    return tuple(rotated)


def _relative_error(rotated_then_f, f_then_rotated, reference):
    num = sum(
        (a - b).reshape(-1, a.shape[-1]).norm(dim=-1).mean()
        for a, b in zip(rotated_then_f, f_then_rotated)
        if torch.is_tensor(a)
    )
    den = sum(r.reshape(-1, r.shape[-1]).norm(dim=-1).mean() for r in reference if torch.is_tensor(r))
    return float(num / den) if float(den) > 0 else float(num)


def _infer_irreps(model, attribute):
    value = getattr(model, attribute, None)
    if value is None and isinstance(model, nn.Sequential) and len(model):
        value = getattr(model[0] if attribute == "irreps_in" else model[-1], attribute, None)
    if value is None:
        raise ValueError(
            f"equirelax: cannot tell how the model's inputs/outputs transform; pass {attribute}= "
            f"(e3nn irreps, one per tensor, None for tensors that do not rotate)"
        )
    return value


def equivariance_error(
    model: nn.Module,
    inputs,
    *,
    irreps_in=None,
    irreps_out=None,
    n_rotations: int = 3,
    group: str = "O3",
    per_layer: bool = True,
    generator: torch.Generator | None = None,
) -> EquivarianceError:
    """Relative equivariance error of ``model`` on ``inputs`` over ``n_rotations`` random group elements.

    ``irreps_in`` / ``irreps_out`` give the e3nn irreps of each input / output
    tensor (None: does not rotate); by default read from the model's own
    ``irreps_in`` / ``irreps_out``. Energies are ``"0e"`` (invariant), forces
    and positions ``"1o"`` in e3nn's (y, z, x) basis. ``per_layer`` adds each
    relaxed layer's own error, measured on the inputs it saw in this pass.
    """
    from .layer import RelaxedLayer

    inputs = _as_tuple(inputs)
    if irreps_in is None:
        irreps_in = _infer_irreps(model, "irreps_in")
    if irreps_out is None:
        irreps_out = _infer_irreps(model, "irreps_out")
    irreps_in = tuple(None if i is None else as_irreps(i) for i in _as_tuple(irreps_in))
    irreps_out = tuple(None if i is None else as_irreps(i) for i in _as_tuple(irreps_out))
    if len(irreps_in) != len(inputs):
        raise ValueError(f"equirelax: {len(inputs)} input tensor(s) but {len(irreps_in)} irreps_in given")

    layers = {name: m for name, m in model.named_modules() if isinstance(m, RelaxedLayer)} if per_layer else {}
    captured = {}

    def capture(name):
        def hook(module, args, output):
            captured.setdefault(name, (tuple(a.detach() if torch.is_tensor(a) else a for a in args), output.detach()))

        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            reference = _as_tuple(model(*inputs))
    finally:
        for h in handles:
            h.remove()

    dtype = next((t.dtype for t in inputs if torch.is_tensor(t) and t.is_floating_point()), torch.float64)
    rotations = random_rotations(n_rotations, group, dtype=torch.float64, generator=generator).to(dtype)
    errors = []
    layer_errors = {name: [] for name in captured}
    with torch.no_grad():
        for R in rotations:
            out_rot = _as_tuple(model(*_rotate(inputs, irreps_in, R)))
            errors.append(_relative_error(out_rot, _rotate(reference, irreps_out, R), reference))
            for name, (args, output) in captured.items():
                layer = layers[name]
                rotated_args = _rotate(args, layer.arg_irreps + (None,) * (len(args) - len(layer.arg_irreps)), R)
                if layer.uses_positions and layer._positions is not None:
                    saved = layer._positions
                    layer.set_positions(saved @ R.to(saved.dtype).T)
                    try:
                        layer_out = layer(*rotated_args)
                    finally:
                        layer.set_positions(saved)
                else:
                    layer_out = layer(*rotated_args)
                expected = _rotate((output,), (layer.irreps_out,), R)
                layer_errors[name].append(_relative_error((layer_out,), expected, (output,)))
    per_layer_result = {name: {"mean": sum(v) / len(v), "max": max(v)} for name, v in layer_errors.items()}
    return EquivarianceError(mean=sum(errors) / len(errors), max=max(errors), layers=per_layer_result)


@contextlib.contextmanager
def symmetry_breaking(model: nn.Module):
    """Measure the symmetry map over every forward pass inside the block: yields a dict that holds, on exit,
    per relaxed layer ``‖γ·P⊥f_neq(x)‖ / ‖f_eq(x)‖`` summed over all rows seen (see ``RelaxedLayer.breaking``).
    Layers must be in relaxed mode."""
    from .layer import RelaxedLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, RelaxedLayer)}
    sums = {name: [0.0, 0.0] for name in layers}

    def hook(name):
        def record(module, args, output):
            if module.mode != "relaxed":
                return
            off, base = module.breaking_sums(module.branch_input(args), output)
            sums[name][0] += float(off)
            sums[name][1] += float(base)

        return record

    result: dict = {}
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        result.update({name: (off / base) ** 0.5 for name, (off, base) in sums.items() if base > 0})
