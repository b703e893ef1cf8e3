"""MACE adapter: relax the linear maps of ``mace.modules.MACE`` / ``ScaleShiftMACE``.

Default targets are each interaction's ``linear`` (the channel mixing applied to
the aggregated messages) and each product block's ``linear`` (the mixing after
the symmetric contraction): the two per-node maps that act on every irrep of
the hidden features, so a non-equivariant branch there can correct any of them.
Branches sit inside ``interactions``/``products``, which MACE's optimizer
collects, and MACE's own classes are kept, so ``extract_config_mace_model`` and
MACE's checkpointing keep working. Export merges back into ``o3.Linear`` and
leaves a plain MACE model.
"""

from __future__ import annotations

import fnmatch

import torch

import mace  # noqa: F401  (sets up e3nn 0.4.4 under torch >= 2.6 the way MACE expects)
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
