"""The external field as an equivariant input of a MACE model: the model a user who knows why the symmetry is
broken would build, and the baseline relaxation has to beat on field data (``field_input:`` in
``equirelax-mace-train``, the ``field-input`` row of ``equirelax compare``).

The field is read per structure as MACE reads PolarMACE's: ``external_field`` ([1, 3], extxyz info), which
MACECalculator also passes. MACE hands per-structure inputs named in ``model.embedding_specs`` to
``model.joint_embedding`` (with the node→structure index) before the interactions; that is where the field
enters. It is kept per node and added to the vector (1o) channels of the first product's output, weighted per
species and channel: h_i,c(1o) += w[z_i, c] F. The next interaction couples it to the geometry (F·r̂_ij and
the products built on it), so energies and forces depend on the field's direction relative to the structure,
and the model is equivariant when field and structure rotate together. w starts at zero: the model predicts
as the one it was built from.
"""

from __future__ import annotations

import torch

import mace  # noqa: F401  (sets up e3nn 0.4.4 under torch >= 2.6)
from e3nn import o3

FIELD_KEY = "external_field"  # MACE's name (PolarMACE, MACECalculator's info_keys)


class FieldInput(torch.nn.Module):
    """``model.joint_embedding``: keeps the field per node for the coupled product; adds nothing itself."""

    def __init__(self, key: str, scalar_channels: int):
        super().__init__()
        self.key = key
        self.scalar_channels = scalar_channels
        self.node_field = None

    def forward(self, batch: torch.Tensor, features: dict) -> torch.Tensor:
        field = features[self.key].reshape(-1, 3)
        self.node_field = field[batch]
        return field.new_zeros(batch.shape[0], self.scalar_channels)  # MACE adds this to the species embedding

    def __getstate__(self):  # a saved model keeps no batch's field
        return {**self.__dict__, "node_field": None}


class FieldCoupledProduct(torch.nn.Module):
    """A MACE product block whose 1o output channels get the field, weighted per species and channel."""

    def __init__(self, product: torch.nn.Module, source: FieldInput, irreps_out: o3.Irreps, n_species: int):
        super().__init__()
        self.product = product
        self.source = source
        self.slices = [(start, mul) for (mul, ir), start in zip(irreps_out, _starts(irreps_out)) if ir == o3.Irrep("1o")]
        channels = sum(mul for _, mul in self.slices)
        self.field_weight = torch.nn.Parameter(torch.zeros(n_species, channels))

    def __getattr__(self, name):  # MACE reads its product's settings (symmetric_contractions, ...) from products[0]
        try:
            return super().__getattr__(name)
        except AttributeError:
            product = self.__dict__.get("_modules", {}).get("product")
            if product is None:
                raise
            return getattr(product, name)

    def forward(self, node_feats, sc, node_attrs):
        out = self.product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
        field = self.source.node_field
        if field is None:
            raise RuntimeError("equirelax: the field-input model read no field: call the whole MACE model, whose "
                               f"batch carries {self.source.key!r}")
        weights = node_attrs @ self.field_weight  # [nodes, 1o channels]
        added, used = torch.zeros_like(out), 0
        for start, mul in self.slices:
            block = weights[:, used:used + mul, None] * field[: out.shape[0], None, :].to(out.dtype)
            added[:, start:start + 3 * mul] = block.reshape(out.shape[0], 3 * mul)
            used += mul
        return out + added


def _starts(irreps: o3.Irreps):
    start = 0
    for mul, ir in irreps:
        yield start
        start += mul * ir.dim


def add_field_input(model: torch.nn.Module, key: str = FIELD_KEY) -> torch.nn.Module:
    """Give ``model`` (a MACE model) the structure's external field ``batch[key]`` as an equivariant input, in
    place; its predictions are unchanged until the field's weights train."""
    if hasattr(model, "joint_embedding"):
        raise ValueError("equirelax: field_input: this MACE model already has embeddings of other inputs "
                         "(embedding_specs); the field input goes where they are")
    product = model.products[0]
    irreps_out = o3.Irreps(str(product.linear.irreps_out))
    if o3.Irrep("1o") not in [ir for _, ir in irreps_out]:
        raise ValueError(f"equirelax: field_input: the field is a polar vector (1o) and MACE's first product puts "
                         f"out {irreps_out}, with no 1o channel to carry it; use hidden_irreps with 1o channels")
    scalar_channels = o3.Irreps(str(model.node_embedding.linear.irreps_out)).dim
    source = FieldInput(key, scalar_channels)
    model.embedding_specs = {key: {"type": "external field (equirelax field_input)", "per": "graph"}}
    model.joint_embedding = source
    model.products[0] = FieldCoupledProduct(product, source, irreps_out, len(model.atomic_numbers))
    return model


def has_field_input(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "joint_embedding", None), FieldInput)
