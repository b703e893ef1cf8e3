"""e3nn adapter: relax any model built from ``o3.Linear`` and ``o3.TensorProduct`` layers.

Works with e3nn 0.4.4 (MACE's pin) and 0.6 (NequIP's). ``o3.Linear`` branches
read the layer's input features; tensor-product branches read both inputs
concatenated. Export merges a projected linear branch into ``o3.Linear``'s own
weight vector, path normalisation included.
"""

from __future__ import annotations

import copy

import torch

from ..core._e3nn import o3
from ..core.irreps import as_irreps, to_device_async
from ..core.projection import HaarProjector
from .base import Adapter, LayerSpec

RELAXABLE = (o3.Linear, o3.TensorProduct)


class E3nnAdapter(Adapter):
    name = "e3nn"
    layer_types = RELAXABLE

    def default_targets(self, model):
        """Every candidate except the tensor products inside e3nn's own activations (``e3nn.nn.Gate``)."""
        inside_activation = {
            f"{parent}.{child}" if parent else child
            for parent, module in model.named_modules()
            if type(module).__module__.startswith("e3nn.nn")
            for child, _ in module.named_modules()
            if child
        }
        return {n: m for n, m in self.candidates(model).items() if n not in inside_activation}

    @staticmethod
    def is_linear(module) -> bool:
        return isinstance(module, o3.Linear)

    def spec(self, module):
        if self.is_linear(module):
            # o3.Linear(features, weight=None, bias=None)
            return LayerSpec(
                arg_irreps=(module.irreps_in, None, None),
                branch_args=(0,),
                irreps_out=module.irreps_out,
                mergeable=bool(module.internal_weights and module.shared_weights),
            )
        if isinstance(module, o3.TensorProduct):
            return LayerSpec(
                arg_irreps=(module.irreps_in1, module.irreps_in2, None),
                branch_args=(0, 1),
                irreps_out=module.irreps_out,
                mergeable=False,
            )
        raise TypeError(f"equirelax: the e3nn adapter cannot relax {type(module).__name__}")

    @staticmethod
    def _weight_instructions(linear) -> list:
        """The instructions that own weights; bias instructions (``i_in == -1``) have no input irrep."""
        return [ins for ins in linear.instructions if ins.i_in != -1]

    @staticmethod
    def _path_scales(linear) -> list[float]:
        """The factor each instruction applies to its weight, read off the layer itself.

        e3nn's normalisation conventions changed between versions; a one-hot weight
        through the layer's own forward gives the factor whatever the version.
        """
        probe = copy.deepcopy(linear).to(device="cpu", dtype=torch.float64)
        no_bias = torch.zeros(linear.bias_numel, dtype=torch.float64)  # the trained bias must not enter the factor
        scales = []
        offset = 0
        slices_in = linear.irreps_in.slices()
        slices_out = linear.irreps_out.slices()
        for ins in E3nnAdapter._weight_instructions(linear):
            weight = torch.zeros(linear.weight_numel, dtype=torch.float64)
            weight[offset] = 1.0
            x = torch.zeros(linear.irreps_in.dim, dtype=torch.float64)
            x[slices_in[ins.i_in].start] = 1.0
            y = probe(x, weight, no_bias)
            scales.append(float(y[slices_out[ins.i_out].start]))
            offset += ins.path_shape[0] * ins.path_shape[1]
        return scales

    def merge_plan(self, layer):
        """Index form of ``merge``: each weight element of the ``o3.Linear`` reads one diagonal entry of its
        irrep block of the dense map (the block is c ⊗ I for an equivariant map) over its path factor.
        None unless the layer has an instruction for every pair of equal irreps (else merging would drop some)."""
        linear = layer.base
        if not (self.is_linear(linear) and layer.mergeable):
            return None
        irreps_in, irreps_out = as_irreps(linear.irreps_in), as_irreps(linear.irreps_out)
        instructions = self._weight_instructions(linear)
        paired = {(ins.i_in, ins.i_out) for ins in instructions}
        for i_in, (_, ir_in) in enumerate(irreps_in):
            for i_out, (_, ir_out) in enumerate(irreps_out):
                if ir_in == ir_out and (i_in, i_out) not in paired:
                    return None
        slices_in, slices_out = irreps_in.slices(), irreps_out.slices()
        rows, cols, factors = [], [], []
        for ins, scale in zip(instructions, self._path_scales(linear)):
            mul_in, mul_out = ins.path_shape
            d = irreps_in[ins.i_in].ir.dim
            u = torch.arange(mul_in).repeat_interleave(mul_out)  # weight layout [mul_in, mul_out]
            w = torch.arange(mul_out).repeat(mul_in)
            rows.append(slices_out[ins.i_out].start + w * d)
            cols.append(slices_in[ins.i_in].start + u * d)
            factors.append(torch.full((mul_in * mul_out,), 1.0 / scale, dtype=torch.float64))
        return MergePlan(linear, layer.projector, torch.cat(rows), torch.cat(cols), torch.cat(factors))

    def merge(self, layer, weight):
        """Add the equivariant dense map ``weight`` (already scaled by γ) to ``o3.Linear`` weights."""
        linear = layer.base
        if not self.is_linear(linear) or not layer.mergeable:
            raise TypeError("equirelax: only o3.Linear layers with internal shared weights can be merged")
        irreps_in, irreps_out = as_irreps(linear.irreps_in), as_irreps(linear.irreps_out)
        projector = HaarProjector(irreps_in, irreps_out, "O3")
        scales = self._path_scales(linear)
        slices_in, slices_out = irreps_in.slices(), irreps_out.slices()
        covered = torch.zeros(projector.shape, dtype=torch.bool)
        delta = torch.zeros(linear.weight_numel, dtype=torch.float64)
        offset = 0
        for ins, scale in zip(self._weight_instructions(linear), scales):
            mul_in, mul_out = ins.path_shape
            d = irreps_in[ins.i_in].ir.dim
            block = weight[slices_out[ins.i_out], slices_in[ins.i_in]].to(torch.float64)
            # block is [mul_out*d, mul_in*d] = c ⊗ I_d; read c from the diagonals
            c = block.reshape(mul_out, d, mul_in, d).diagonal(dim1=1, dim2=3).mean(-1)  # [mul_out, mul_in]
            delta[offset : offset + mul_in * mul_out] += (c.T / scale).reshape(-1).cpu()
            covered[slices_out[ins.i_out], slices_in[ins.i_in]] = True
            offset += mul_in * mul_out
        leftover = weight.detach().cpu().to(torch.float64).masked_fill(covered, 0.0)
        if leftover.abs().max() > 1e-12 * max(1.0, float(weight.abs().max())):
            raise ValueError(
                "equirelax: the projected branch has equivariant paths that this o3.Linear has no instruction "
                "for, so it cannot be merged exactly; export with mode='drop' or build the layer with all paths"
            )
        with torch.no_grad():
            linear.weight.add_(delta.to(device=linear.weight.device, dtype=linear.weight.dtype))


class MergePlan:
    """Adds an equivariant map into an ``o3.Linear``'s weights during training, on the map's device and without
    a host sync: each weight element takes the scalar of its irrep block (the (0, 0) entry of c ⊗ I) over its
    path factor. ``plan(weight)`` takes the dense map; ``plan.add_coefficients(blocks)`` the scalars themselves
    (``projector.coefficients`` / ``lowrank_coefficients`` of the layer's projector), without a dense map."""

    def __init__(self, linear, projector, rows, cols, factors):
        self.linear, self.rows, self.cols, self.factors = linear, rows, cols, factors
        # where each element's scalar sits in the projector's blocks, flattened and concatenated
        out_copy, in_copy, offset = {}, {}, 0  # first column of a copy -> its row / (Ci, flat column) in blocks
        for (out_starts, _), (in_starts, _) in projector.copy_starts:
            out_copy.update({start: a for a, start in enumerate(out_starts)})
            in_copy.update({start: (len(in_starts), offset + b) for b, start in enumerate(in_starts)})
            offset += len(out_starts) * len(in_starts)
        self.flat = torch.tensor([in_copy[c][1] + out_copy[r] * in_copy[c][0]
                                  for r, c in zip(rows.tolist(), cols.tolist())])
        self._cache = {}

    def _on(self, device):
        # built once per device, asynchronously: a blocking host-to-device copy would stall the queue
        key = (device, self.linear.weight.dtype)
        if key not in self._cache:
            self._cache[key] = (to_device_async(self.rows, device), to_device_async(self.cols, device),
                                to_device_async(self.flat, device),
                                to_device_async(self.factors, device, self.linear.weight.dtype))
        return self._cache[key]

    def __call__(self, weight: torch.Tensor) -> None:
        rows, cols, _, factors = self._on(weight.device)
        with torch.no_grad():
            self.linear.weight.add_(weight[rows, cols].to(self.linear.weight.dtype) * factors)

    def add_coefficients(self, blocks: list) -> None:
        with torch.no_grad():
            self.linear.weight.add_(self._delta(blocks))

    def gradient_along(self, blocks: list):
        """⟨∂J/∂w, Δw⟩ for the Δw that ``add_coefficients(blocks)`` would add: the loss's derivative along adding
        that equivariant map into the layer, read off the weights' gradient (None when they have none)."""
        grad = self.linear.weight.grad
        return None if grad is None else (grad * self._delta(blocks)).sum()

    def _delta(self, blocks: list) -> torch.Tensor:
        _, _, flat, factors = self._on(blocks[0].device)
        scalars = torch.cat([block.reshape(-1) for block in blocks])
        return scalars.index_select(0, flat).to(self.linear.weight.dtype) * factors
