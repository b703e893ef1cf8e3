"""MACE adapter: relax the linear maps of ``mace.modules.MACE`` / ``ScaleShiftMACE``.

Default targets are each interaction's ``linear`` (the channel mixing applied to
the aggregated messages) and each product block's ``linear`` (the mixing after
the symmetric contraction): the two per-node maps that act on every irrep of
the hidden features, so a non-equivariant branch there can correct any of them.
Branches sit inside ``interactions``/``products``, which MACE's optimizer
collects, and MACE's own classes are kept, so ``extract_config_mace_model`` and
MACE's checkpointing keep working. Export merges back into ``o3.Linear`` and
leaves a plain MACE model.

``add_field_input`` gives a MACE model the structure's external field as an equivariant input instead: the
baseline relaxation is compared with when the cause of the broken symmetry is known.
"""

from __future__ import annotations

import fnmatch

import torch

import mace  # noqa: F401  (sets up e3nn 0.4.4 under torch >= 2.6 the way MACE expects)
from e3nn import o3
from mace import modules as mace_modules

from .e3nn import E3nnAdapter

DEFAULT_TARGETS = ("interactions.*.linear", "products.*.linear")


class MaceAdapter(E3nnAdapter):
    name = "mace"

    def matches(self, model):
        return isinstance(model, mace_modules.MACE)

    def default_targets(self, model):
        return {
            name: module
            for name, module in self.candidates(model).items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in DEFAULT_TARGETS)
        }


def mace_batch(frames, table, cutoff: float) -> dict:
    """A MACE batch dict from ASE ``Atoms`` (``REF_energy`` / ``REF_forces`` become energy/forces, and info
    ``external_field`` the structure's field, when present)."""
    import numpy as np
    from mace import data
    from mace.tools import torch_geometric

    items = []
    for atoms in frames:
        properties = {}
        if "REF_energy" in atoms.info:
            properties["energy"] = atoms.info["REF_energy"]
        if "REF_forces" in atoms.arrays:
            properties["forces"] = atoms.arrays["REF_forces"]
        if "external_field" in atoms.info:  # read by models given the field (PolarMACE, field_input)
            properties["external_field"] = np.asarray(atoms.info["external_field"], dtype=float)
        config = data.Configuration(
            atomic_numbers=atoms.numbers, positions=atoms.positions, cell=np.array(atoms.cell), pbc=tuple(atoms.pbc),
            properties=properties, property_weights={key: 1.0 for key in properties},
        )
        items.append(data.AtomicData.from_config(config, z_table=table, cutoff=cutoff))
    return next(iter(torch_geometric.dataloader.DataLoader(items, batch_size=len(items)))).to_dict()


def _rotate_batch(batch: dict, R: torch.Tensor) -> dict:
    rotated = dict(batch)
    for key in ("positions", "shifts", "cell", "external_field"):  # a field rotates with the structure
        if key in batch and batch[key] is not None:
            rotated[key] = batch[key] @ R.T.to(batch[key].dtype)
    return rotated


def mace_equivariance_error(model, batch: dict, n_rotations: int = 3, generator=None) -> dict:
    """Relative equivariance error of MACE energies (invariant) and forces (vectors).

    ``batch`` is a MACE batch dict (``AtomicData`` batch ``.to_dict()``). Returns
    ``{"energy": {"mean", "max"}, "forces": {"mean", "max"}}``.
    """
    from ..core.irreps import random_rotations

    reference = model(batch, training=False, compute_force=True)
    energy, forces = reference["energy"].detach(), reference["forces"].detach()
    errors = {"energy": [], "forces": []}
    for R in random_rotations(n_rotations, "O3", dtype=batch["positions"].dtype, generator=generator):
        out = model(_rotate_batch(batch, R), training=False, compute_force=True)
        errors["energy"].append(float((out["energy"].detach() - energy).abs().mean() / energy.abs().mean().clamp_min(1e-30)))
        expected = forces @ R.T
        errors["forces"].append(
            float((out["forces"].detach() - expected).norm(dim=-1).mean() / forces.norm(dim=-1).mean().clamp_min(1e-30))
        )
    return {key: {"mean": sum(v) / len(v), "max": max(v)} for key, v in errors.items()}


# ------------------------------------------------------------------ the field as an input
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
        self.slices = [(part.start, mul) for (mul, ir), part in zip(irreps_out, irreps_out.slices())
                       if ir == o3.Irrep("1o")]
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


def add_field_input(model: torch.nn.Module, key: str = FIELD_KEY) -> torch.nn.Module:
    """Give ``model`` (a MACE model) each structure's external field ``batch[key]`` as an equivariant input, in
    place: the model to build when the cause of the broken symmetry is known (``field_input`` in
    ``equirelax-mace-train``, the ``field-input`` row of compare).

    MACE hands per-structure inputs named in ``model.embedding_specs`` to ``model.joint_embedding`` before the
    interactions (PolarMACE's ``external_field`` comes in the same batch key). The field is kept per node there
    and added to the 1o channels of the first product's output, weighted per species and channel:
    h_i,c(1o) += w[z_i, c] F. The next interaction couples it to the geometry (F·r̂_ij ...), so the model is
    equivariant when field and structure rotate together. w starts at zero: predictions are unchanged until
    it trains."""
    if has_field_input(model):
        return model
    if hasattr(model, "joint_embedding"):
        raise ValueError("equirelax: field_input: the field enters through MACE's embedding of extra inputs, which "
                         f"this model already uses for {sorted(model.embedding_specs)} (embedding_specs)")
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
