"""Haar projection onto equivariant maps.

For a linear map W between e3nn irreps, the Haar average
``P(W) = ∫ ρ_out(g)^-1 W ρ_in(g) dg`` is closed form: each block between two
copies of the same irrep becomes ``trace(block)/(2l+1) · I``, every other
block vanishes. P is the orthogonal (Frobenius) projector onto the commutant.
Non-linear maps are averaged by Monte Carlo over sampled rotations.
"""

from __future__ import annotations

from typing import Callable

import torch

from .irreps import (as_irreps, check_group, copy_indices, irrep_copy_starts, random_rotations, to_device_async,
                     wigner_D)


class HaarProjector:
    """Closed-form projection of ``[..., dim_out, dim_in]`` matrices onto equivariant maps."""

    def __init__(self, irreps_in, irreps_out, group: str = "O3"):
        self.irreps_in = as_irreps(irreps_in)
        self.irreps_out = as_irreps(irreps_out)
        self.group = check_group(group)
        # ([first column of each copy], d) of every irrep type present on both sides, (out, in), as plain ints
        # (a projector may be built inside a training step, which must read nothing back from a device)
        starts_out, starts_in = irrep_copy_starts(self.irreps_out, group), irrep_copy_starts(self.irreps_in, group)
        self.copy_starts = [(starts_out[key], starts_in[key]) for key in starts_out if key in starts_in]
        # (out copies [Co, d], in copies [Ci, d]) for every irrep type present on both sides
        self.blocks = [(copy_indices(*out), copy_indices(*inp)) for out, inp in self.copy_starts]

        def one_run(starts, d):
            return starts == list(range(starts[0], starts[0] + d * len(starts), d))

        # (first out column, first in column) of each type whose copies are one run of columns on both sides,
        # as e3nn lays out simplified irreps: blocks are then slices and views, not gathers and scatters
        runs = self.copy_starts
        self.slices = [(out[0][0], inp[0][0]) for out, inp in runs] if all(
            one_run(*out) and one_run(*inp) for out, inp in runs) else None
        self._runs = None if self.slices is None else {
            "out": self._columns([(out[0][0], len(out[0]) * out[1], k) for k, (out, _) in enumerate(runs)],
                                 self.irreps_out.dim),
            "in": self._columns([(inp[0][0], len(inp[0]) * inp[1], k) for k, (_, inp) in enumerate(runs)],
                                self.irreps_in.dim)}
        self._on_device = {}

    @staticmethod
    def _columns(runs: list, dim: int) -> list:
        """(width, block index or None) of consecutive column runs covering ``dim`` columns."""
        pieces, column = [], 0
        for start, width, index in sorted(runs):
            if start > column:
                pieces.append((start - column, None))
            pieces.append((width, index))
            column = start + width
        if column < dim:
            pieces.append((dim - column, None))
        return pieces

    def _blocks(self, device):
        # index tensors copied once per device, asynchronously: the first step must not stall the GPU queue
        if device not in self._on_device:
            self._on_device[device] = [
                (to_device_async(out_idx[:, None, :], device), to_device_async(in_idx[None, :, :], device),
                 out_idx.shape[1])
                for out_idx, in_idx in self.blocks
            ]
        return self._on_device[device]

    @property
    def shape(self):
        return (self.irreps_out.dim, self.irreps_in.dim)

    def _check(self, W: torch.Tensor):
        self._check_shape(tuple(W.shape[-2:]))

    def _check_shape(self, shape: tuple):
        if shape != self.shape:
            raise ValueError(
                f"equirelax: matrix of shape {shape} does not map {self.irreps_in} "
                f"(dim {self.irreps_in.dim}) to {self.irreps_out} (dim {self.irreps_out.dim})"
            )

    def coefficients(self, W: torch.Tensor):
        """Per irrep type, the scalar of each (out copy, in copy) block: list of ``[..., Co, Ci]``."""
        self._check(W)
        coefficients = []
        for rows, cols, d in self._blocks(W.device):
            # diagonal entries of every block: W[..., out_idx[a, m], in_idx[b, m]] -> [..., Co, Ci, d]
            coefficients.append(W[..., rows, cols].sum(-1) / d)
        return coefficients

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        P = torch.zeros_like(W)
        for (rows, cols, d), c in zip(self._blocks(W.device), self.coefficients(W)):
            P[..., rows, cols] = c[..., None].expand(*c.shape, d)
        return P

    def _copies(self, x: torch.Tensor, side: str) -> list:
        """Each block's copies of its irrep in the last axis of x (``side`` "in" or "out"): [..., C, d] per
        block. Where the blocks are runs of columns, one split (its backward is one cat, where a slice per
        block fills a zero tensor of x's size each); else gathers."""
        blocks = self._blocks(x.device)
        if self.slices is None:
            return [x[..., rows[:, 0, :]] if side == "out" else x[..., cols[0]] for rows, cols, _ in blocks]
        copies = [None] * len(blocks)
        pieces = self._runs[side]
        for part, (_, index) in zip(x.split([width for width, _ in pieces], -1), pieces):
            if index is not None:
                copies[index] = part.unflatten(-1, (-1, blocks[index][2]))
        return copies

    def _assemble(self, blocks: list, k: int, x: torch.Tensor) -> torch.Tensor:
        """``[k, n, dim_out]`` from each block's ``[k, n, Co, d]`` output for the rows x [n, dim_in]; other columns
        zero."""
        n = x.shape[0]
        if self.slices is None:
            y = x.new_zeros(k, n, self.irreps_out.dim)
            for (rows, _, _), block in zip(self._blocks(x.device), blocks):
                y[:, :, rows[:, 0, :]] = block
            return y
        # runs in column order, zeros between them: a cat, no scatter
        return torch.cat([x.new_zeros(k, n, width) if index is None else blocks[index].flatten(-2)
                          for width, index in self._runs["out"]], -1)

    def lowrank_coefficients(self, B: torch.Tensor, A: torch.Tensor):
        """``coefficients(B @ A)`` without forming B·A (B [dim_out, r], A [r, dim_in]): each block's trace
        contracted through the rank."""
        self._check_shape((B.shape[-2], A.shape[-1]))
        # per block Σ_{m,r} B[(a, m), r] A[r, (b, m)] / d as one [Co, d·r] @ [d·r, Ci] product (einsum's planning
        # cost several times the product on these small blocks)
        return [(B_block.permute(1, 2, 0).reshape(B_block.shape[1], -1)
                 @ A_block.permute(2, 0, 1).reshape(-1, A_block.shape[1])) / d
                for B_block, A_block, (_, _, d) in zip(self._copies(B.transpose(-1, -2), "out"),
                                                        self._copies(A, "in"), self._blocks(B.device))]

    def apply_coefficients(self, maps: list, x: torch.Tensor) -> torch.Tensor:
        """k equivariant maps, each given by its block scalars (``coefficients`` or ``lowrank_coefficients``),
        applied to rows ``x`` [n, dim_in]: ``[k, n, dim_out]``. Each irrep's copies of x are taken once for
        all k maps (Co·Ci·d per row and map, not dim_out·dim_in)."""
        blocks = [torch.einsum("kab,nbd->knad", torch.stack(coefficients), x_block)
                  for coefficients, x_block in zip(zip(*maps), self._copies(x, "in"))]
        return self._assemble(blocks, len(maps), x)

    def apply_lowrank(self, B: torch.Tensor, A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """P(B_k·A_k) applied to rows ``x`` [n, dim_in] for k maps of rank r (B [k, dim_out, r], A [k, r,
        dim_in]): ``[k, n, dim_out]``, through the rank: a block's scalars have rank ≤ r·d, so this costs
        r·d·(Co + Ci)·d per row and map instead of Co·Ci·d (fewer for r·d small against the copies)."""
        self._check_shape((B.shape[-2], A.shape[-1]))
        blocks = []
        for A_block, x_block, B_block, (_, _, d) in zip(self._copies(A, "in"), self._copies(x, "in"),
                                                         self._copies(B.transpose(-1, -2), "out"),  # [k, r, Co, d]
                                                         self._blocks(x.device)):
            # z[k, n, r, m, e] = Σ_b A[k, r, (b, m)] x[n, (b, e)]; out[k, n, a, e] = Σ_{r,m} B[k, (a, m), r] z / d
            z = torch.einsum("krbm,nbe->knrme", A_block, x_block)
            blocks.append(torch.einsum("kram,knrme->knae", B_block, z) / d)
        return self._assemble(blocks, B.shape[0], x)

    def orthogonal_complement(self, W: torch.Tensor) -> torch.Tensor:
        """``W - P(W)``: the part of W that breaks the symmetry."""
        return W - self(W)


def mc_project(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    irreps_in,
    irreps_out,
    *,
    n_samples: int = 64,
    group: str = "O3",
    generator: torch.Generator | None = None,
):
    """Monte Carlo Haar average ``(1/K) Σ_g ρ_out(g)^T fn(ρ_in(g) x)``.

    Returns ``(value, stderr)``: the projected output and the standard error of
    the mean over the K sampled group elements (same shape as the value), so the
    sampling error can be reported next to the result.
    """
    R = random_rotations(n_samples, group, dtype=x.dtype, generator=generator)
    D_in = wigner_D(irreps_in, R).to(x.device)
    D_out = wigner_D(irreps_out, R).to(x.device)
    samples = []
    for k in range(n_samples):
        y = fn(x @ D_in[k].T)
        samples.append(y @ D_out[k])  # ρ_out(g)^-1 = ρ_out(g)^T applied to row vectors
    stacked = torch.stack(samples)
    value = stacked.mean(0)
    stderr = stacked.std(0, unbiased=True) / n_samples**0.5 if n_samples > 1 else torch.zeros_like(value)
    return value, stderr
