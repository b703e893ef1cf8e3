"""NequIP adapter: relax the linear maps of NequIP's interaction blocks.

Default targets are each convolution's ``linear_1`` (channel mixing of the node
features before the tensor product) and ``linear_2`` (mixing of the aggregated
messages), inside every ``layer{i}_convnet``. The interaction block keeps its
irreps, so ``GraphModuleMixin`` bookkeeping is untouched. Models loaded through
``ModelFromPackage`` carry package-local copies of e3nn's classes, so layers
are recognised by what they are (an e3nn ``Linear``), not by ``isinstance``.
"""

from __future__ import annotations

import fnmatch

import torch

from ..core._e3nn import o3
from .e3nn import RELAXABLE, E3nnAdapter

DEFAULT_TARGETS = ("*_convnet.conv.linear_1", "*_convnet.conv.linear_2")


def _is_nequip_class(module) -> bool:
    # package-local classes live in modules such as "<torch_package_0>.nequip.nn.graph_model"
    return ".nequip." in "." + type(module).__module__ + "."


class NequipAdapter(E3nnAdapter):
    name = "nequip"
    positions_key = "pos"  # the batch keys of its data (the atoms' structure index is "batch", as in MACE)

    def matches(self, model):
        return any(_is_nequip_class(m) for m in model.modules()) and bool(self.candidates(model))

    @staticmethod
    def is_linear(module) -> bool:
        if isinstance(module, o3.Linear):
            return True
        cls = type(module)
        return cls.__name__ == "Linear" and cls.__module__.endswith("e3nn.o3._linear")

    def candidates(self, model):
        return {
            name: m for name, m in model.named_modules() if isinstance(m, RELAXABLE) or self.is_linear(m)
        }

    def short_name(self, name):
        # a NequIP GraphModel keeps its network under model.func (``model.func.layer0_convnet.conv.linear_1``)
        for wrapper in ("model.func.", "func."):
            if name.startswith(wrapper):
                return name[len(wrapper):]
        return name

    def default_targets(self, model):
        return {
            name: module
            for name, module in self.candidates(model).items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in DEFAULT_TARGETS)
        }


OUTPUT_KEYS = ("total_energy", "forces", "stress", "virial", "atomic_energy")


def nequip_equivariance_error(model, data: dict, n_rotations: int = 3, generator=None) -> dict:
    """Relative equivariance error of a NequIP model's total energy (invariant) and forces (vectors).

    ``data`` is an ``AtomicDataDict`` batch. Positions and cell rotate; cell
    shifts are in lattice coordinates and do not. Returns
    ``{"energy": {"mean", "max"}, "forces": {"mean", "max"}}``.
    """
    from ..core.irreps import random_rotations

    inputs = {k: v for k, v in data.items() if k not in OUTPUT_KEYS and not k.startswith("edge_vectors")}
    with torch.enable_grad():
        reference = model(dict(inputs))
        energy, forces = reference["total_energy"].detach(), reference["forces"].detach()
        errors = {"energy": [], "forces": []}
        pos = inputs["pos"]
        for R in random_rotations(n_rotations, "O3", dtype=pos.dtype, generator=generator):
            R = R.to(pos.device)
            rotated = dict(inputs)
            rotated["pos"] = pos @ R.T
            if "cell" in inputs:
                rotated["cell"] = inputs["cell"] @ R.T
            out = model(rotated)
            errors["energy"].append(
                float((out["total_energy"].detach() - energy).abs().mean() / energy.abs().mean().clamp_min(1e-30))
            )
            expected = forces @ R.T
            errors["forces"].append(
                float((out["forces"].detach() - expected).norm(dim=-1).mean()
                      / forces.norm(dim=-1).mean().clamp_min(1e-30))
            )
    return {key: {"mean": sum(v) / len(v), "max": max(v)} for key, v in errors.items()}


def nequip_batch(frames, type_names, r_max: float) -> dict:
    """A NequIP ``AtomicDataDict`` batch from ASE ``Atoms`` (``REF_energy``/``REF_forces`` become
    ``total_energy``/``forces`` when present), through NequIP's own transforms."""
    from nequip.data import AtomicDataDict, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.utils.dtype import torch_default_dtype

    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=list(type_names),
                                             chemical_species_to_atom_type_map={n: n for n in type_names})
    neighbours = NeighborListTransform(r_max=float(r_max))
    with torch_default_dtype(torch.float64):  # NequIP keeps data in float64 whatever the model dtype
        items = [neighbours(mapper(from_ase(atoms, key_mapping={"REF_energy": "total_energy",
                                                                "REF_forces": "forces"})))
                 for atoms in frames]
        return AtomicDataDict.batched_from_list(items)
