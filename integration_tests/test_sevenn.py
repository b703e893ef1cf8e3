"""SevenNet-0, the pretrained universal potential the sevenn wheel ships: relaxed with step-0 predictions identical,
exported equivariant, and back as a plain SevenNet checkpoint that SevenNetCalculator runs MD with, equirelax absent
(NequIP environment)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")

import equirelax  # noqa: E402
from equirelax.datasets.emt import emt_configurations  # noqa: E402

SELF_INTERACTIONS = [f"{t}_self_interaction_{i}.linear" for t in range(5) for i in (1, 2)]


@pytest.fixture(scope="module")
def sevennet():
    from sevenn.util import model_from_checkpoint, pretrained_name_to_path

    torch.set_num_threads(1)
    model, _ = model_from_checkpoint(pretrained_name_to_path("7net-0"))
    return model.eval()


@pytest.fixture(scope="module")
def clusters():
    return emt_configurations(2, seed=4)


def predict(model, atoms):
    from sevenn.calculator import SevenNetCalculator

    atoms = atoms.copy()
    atoms.calc = SevenNetCalculator(model=model, device="cpu")
    return atoms.get_potential_energy(), atoms.get_forces()


def test_default_targets_and_identical_step_zero_predictions(sevennet, clusters):
    import copy

    relaxed = copy.deepcopy(sevennet)
    handle = equirelax.relax(relaxed, "ace", total_steps=75)
    assert handle.adapter.name == "sevenn" and sorted(handle.layers) == sorted(SELF_INTERACTIONS)
    for atoms in clusters:
        energy, forces = predict(sevennet, atoms)
        relaxed_energy, relaxed_forces = predict(relaxed, atoms)
        assert relaxed_energy == energy and np.array_equal(relaxed_forces, forces)


EQUIRELAX_ABSENT = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "equirelax":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
import numpy as np
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet
from sevenn.calculator import SevenNetCalculator

atoms = read("cluster.xyz")
atoms.calc = SevenNetCalculator(model="exported.pth", device="cpu")
print("E0", repr(atoms.get_potential_energy()))
start = atoms.get_potential_energy() + atoms.get_kinetic_energy()
VelocityVerlet(atoms, 1.0 * units.fs).run(10)
assert np.isfinite(atoms.get_forces()).all()
print("DRIFT", abs(atoms.get_potential_energy() + atoms.get_kinetic_energy() - start))
"""


def test_exported_checkpoint_is_equivariant_and_runs_md_without_equirelax(sevennet, clusters, tmp_path):
    import copy

    from e3nn import o3

    from equirelax.plugins.sevenn import export_checkpoint

    torch.manual_seed(0)
    relaxed = copy.deepcopy(sevennet)
    handle = equirelax.relax(relaxed, "fixed", gamma=0.5, init="random", init_std=0.05)
    atoms = clusters[0]
    energy, _ = predict(sevennet, atoms)
    relaxed_energy, _ = predict(relaxed, atoms)
    assert abs(relaxed_energy - energy) > 1e-4  # the branches change the prediction

    path = export_checkpoint(relaxed, "7net-0", tmp_path / "exported.pth")
    exported = equirelax.export(copy.deepcopy(relaxed), mode="merge")
    assert not any(type(m).__module__.startswith("equirelax") for m in exported.modules())
    with handle.projected():  # the exported model is the relaxed model's equivariant projection
        projected_energy, projected_forces = predict(relaxed, atoms)
    exported_energy, exported_forces = predict(exported, atoms)
    assert exported_energy == pytest.approx(projected_energy, abs=1e-4)
    assert np.allclose(exported_forces, projected_forces, atol=1e-4)

    rotation = o3.angles_to_matrix(*torch.tensor([0.4, 1.2, -0.8], dtype=torch.float64)).numpy()
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated_energy, rotated_forces = predict(exported, rotated)
    scale = np.abs(exported_forces).max()
    assert abs(rotated_energy - exported_energy) / abs(exported_energy) < 1e-6
    assert np.abs(rotated_forces - exported_forces @ rotation.T).max() / scale < 1e-4  # float32
    relaxed_rotated_energy, _ = predict(relaxed, rotated)
    assert abs(relaxed_rotated_energy - relaxed_energy) > 1e-4  # the relaxed model was not

    atoms.write(tmp_path / "cluster.xyz")
    md = subprocess.run([sys.executable, "-c", EQUIRELAX_ABSENT], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600)
    assert md.returncode == 0, md.stderr[-3000:]
    assert float(md.stdout.split("E0")[1].split()[0]) == pytest.approx(exported_energy, abs=1e-4)
    assert float(md.stdout.split("DRIFT")[1]) < 0.05  # eV over 10 steps: forces are the energy's gradient
    assert path == tmp_path / "exported.pth"
