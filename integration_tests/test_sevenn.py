"""SevenNet-0, the pretrained universal potential the sevenn wheel ships: relaxed with step-0 predictions identical,
exported equivariant, and back as a plain SevenNet checkpoint that SevenNetCalculator runs MD with, equirelax absent
(NequIP environment)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")

import equirelax  # noqa: E402
from equirelax.datasets.emt import emt_configurations  # noqa: E402

SELF_INTERACTIONS = [f"{t}_self_interaction_{i}.linear" for t in range(5) for i in (1, 2)]


@pytest.fixture(scope="module", autouse=True)
def sevenn_process_defaults():
    """What a process that runs SevenNet has: torch's default float32 (its checkpoint loading compares Wigner
    constants in it) and e3nn's own code-generation defaults. Earlier tests in this process (NequIP's set-up)
    may have changed both (e3nn's script mode makes SevenNet models that cannot be deep-copied)."""
    import e3nn

    previous_dtype, previous_e3nn = torch.get_default_dtype(), e3nn.get_optimization_defaults()
    torch.set_default_dtype(torch.float32)
    e3nn.set_optimization_defaults(specialized_code=True, optimize_einsums=True, jit_script_fx=True,
                                   jit_mode="eager")
    yield
    torch.set_default_dtype(previous_dtype)
    e3nn.set_optimization_defaults(**previous_e3nn)


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


MD_SCRIPT = """
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


def test_exported_checkpoint_is_equivariant_and_runs_md_without_equirelax(sevennet, clusters, tmp_path,
                                                                         not_installed):
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
    md = subprocess.run([sys.executable, "-c", not_installed + MD_SCRIPT], cwd=tmp_path, capture_output=True, text=True,
                        timeout=600)
    assert md.returncode == 0, md.stderr[-3000:]
    assert float(md.stdout.split("E0")[1].split()[0]) == pytest.approx(exported_energy, abs=1e-4)
    assert float(md.stdout.split("DRIFT")[1]) < 0.05  # eV over 10 steps: forces are the energy's gradient
    assert path == tmp_path / "exported.pth"


LAMMPS_LIKE = """
import json
import torch
from ase.io import read

def lammps_like(path, atoms):
    # what pair_e3gnn hands a serial model for a system without periodic images, and its forces from dE/d(edge_vec)
    extra = {"chemical_symbols_to_index": "", "cutoff": ""}
    model = torch.jit.load(path, _extra_files=extra)
    symbols, cutoff = extra["chemical_symbols_to_index"].decode().split(), float(extra["cutoff"].decode())
    positions, n = torch.tensor(atoms.positions, dtype=torch.float32), len(atoms)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = (i != j) & ((positions[j] - positions[i]).norm(dim=-1) < cutoff)
    src, dst = i[keep], j[keep]
    edge_vec = (positions[dst] - positions[src]).requires_grad_(True)
    data = {"x": torch.tensor([symbols.index(s) for s in atoms.get_chemical_symbols()]),
            "edge_index": torch.stack([src, dst]), "edge_vec": edge_vec,
            "num_atoms": torch.tensor([n]), "nlocal": torch.tensor([n])}
    energy = model(data)["inferred_total_energy"].squeeze()
    dE_dr, = torch.autograd.grad(energy, edge_vec)
    forces = torch.zeros(n, 3).index_add_(0, src, dE_dr).index_add_(0, dst, -dE_dr)
    return {"energy": float(energy.detach()), "forces": forces.tolist()}

atoms = read("cluster.xyz")
print("OUT" + json.dumps({p: lammps_like(p, atoms) for p in ("deployed_serial.pt", "deployed_serial_relaxed.pt")}))
"""


def test_relaxed_and_exported_checkpoints_deploy_as_sevenn_lammps_models(sevennet, clusters, tmp_path,
                                                                       not_installed):
    """The exported plain checkpoint through sevenn's own ``sevenn_get_model``; the relaxed checkpoint (γ and branches
    kept) through ``equirelax deploy --host sevenn``. Both serial TorchScript models run where equirelax is absent,
    fed as pair_e3gnn feeds them, and give their model's energy and forces."""
    import copy
    import json

    from sevenn.util import load_checkpoint

    from equirelax.plugins.sevenn import export_checkpoint

    torch.manual_seed(1)
    relaxed = copy.deepcopy(sevennet)
    equirelax.relax(relaxed, "fixed", gamma=0.5, init="random", init_std=0.05)
    checkpoint = load_checkpoint("7net-0").get_checkpoint_dict()
    checkpoint["model_state_dict"] = relaxed.state_dict()  # as a relaxed run's checkpoint holds it
    torch.save(checkpoint, tmp_path / "relaxed.pth")
    export_checkpoint(relaxed, "7net-0", tmp_path / "exported.pth")
    exported = equirelax.export(copy.deepcopy(relaxed), mode="merge")
    atoms = clusters[0]
    assert not atoms.pbc.any()
    atoms.write(tmp_path / "cluster.xyz")

    bin_dir = Path(sys.executable).parent
    plain = subprocess.run([str(bin_dir / "sevenn_get_model"), "exported.pth", "-o", "deployed_serial"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    deployed = subprocess.run([str(bin_dir / "equirelax"), "deploy", "--host", "sevenn", "relaxed.pth"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert "deployed_serial_relaxed.pt" in deployed.stdout
    run = subprocess.run([sys.executable, "-c", not_installed + LAMMPS_LIKE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("OUT")[1])
    for path, model in (("deployed_serial.pt", exported), ("deployed_serial_relaxed.pt", relaxed)):
        energy, forces = predict(model, atoms)
        assert out[path]["energy"] == pytest.approx(energy, abs=1e-4), path
        assert np.abs(np.array(out[path]["forces"]) - forces).max() < 1e-4, path  # float32
    assert abs(out["deployed_serial_relaxed.pt"]["energy"] - out["deployed_serial.pt"]["energy"]) > 1e-3


def test_deploying_a_plain_sevenn_checkpoint_names_sevenns_own_command(tmp_path):
    from sevenn.util import load_checkpoint

    torch.save(load_checkpoint("7net-0").get_checkpoint_dict(), tmp_path / "plain.pth")
    result = subprocess.run([str(Path(sys.executable).parent / "equirelax"), "deploy", "--host", "sevenn",
                             "plain.pth"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "no relaxed layer" in result.stderr and "sevenn_get_model" in result.stderr


# ------------------------------------------------------------------ sevenn's own fine-tuning
def _sevenn_data(directory):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for atoms in emt_configurations(20, seed=0, field=[0.0, 0.0, 0.3]):
        energy, forces = atoms.info.pop("REF_energy"), atoms.arrays.pop("REF_forces")
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    write(directory / "train.extxyz", frames[:16])
    write(directory / "valid.extxyz", frames[16:])


def _input_yaml(directory, name, relax=None, **train):
    """sevenn's own fine-tuning preset for SevenNet-0, on the generated data, plus a relax section."""
    from importlib.resources import files

    import yaml

    config = yaml.safe_load((files("sevenn") / "presets" / "fine_tune.yaml").read_text())
    config["train"].update({"epoch": 2, "is_train_stress": False, "per_epoch": 1,
                            "error_record": [["Energy", "RMSE"], ["Force", "RMSE"], ["TotalLoss", "None"]], **train})
    config["train"]["continue"]["checkpoint"] = "7net-0"
    config["data"].update({"load_trainset_path": ["./train.extxyz"], "load_validset_path": ["./valid.extxyz"]})
    config["data"].pop("load_testset_path")
    if relax is not None:
        config["relax"] = relax
    (directory / name).write_text(yaml.safe_dump(config, sort_keys=False))


def _sevenn_cli(directory, *arguments, command="equirelax-sevenn", threads=None):
    """The run takes the suite's thread count unless ``threads`` says otherwise (make test gives each of the
    two environments' suites one core)."""
    env = {**os.environ, **({} if threads is None else {"OMP_NUM_THREADS": str(threads)})}
    return subprocess.run([str(Path(sys.executable).parent / command), *arguments, "-s"], cwd=directory,
                          capture_output=True, text=True, timeout=900, env=env)


def _levels(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model_state_dict"]
    return {k[:-len(".gamma")]: float(v) for k, v in state.items() if k.endswith(".gamma")}, \
        {k: int(v) for k, v in state.items() if k.endswith(".ctrl_step")}


@pytest.fixture(scope="module")
def sevenn_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sevenn")
    _sevenn_data(directory)
    _input_yaml(directory, "input.yaml", relax={"controller": "ace"})
    result = _sevenn_cli(directory, "input.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return directory


def test_sevenn_fine_tuning_runs_the_controller_and_writes_a_plain_checkpoint(sevenn_run, not_installed):
    log = (sevenn_run / "log.sevenn").read_text()
    assert f"equirelax: relaxed {SELF_INTERACTIONS} with controller 'ace'" in log
    lines = [line for line in log.splitlines() if line.startswith("equirelax: gamma/0_self_interaction_1.linear=")]
    assert len(lines) == 2  # one per epoch
    levels, steps = _levels(sevenn_run / "checkpoint_2.pth")
    assert sorted(levels) == sorted(SELF_INTERACTIONS)
    assert all(g == 0.0 for g in levels.values())  # ACE closes at the budget's last step
    assert set(steps.values()) == {8}  # 2 epochs × 4 batches of 4
    relaxed_levels, _ = _levels(sevenn_run / "checkpoint_best_relaxed.pth")
    assert relaxed_levels  # the relaxed best model is kept beside the exported one

    from ase.io import read

    read(sevenn_run / "valid.extxyz", 0).write(sevenn_run / "cluster.xyz")
    script = not_installed + MD_SCRIPT.replace('model="exported.pth"', 'model="checkpoint_best.pth"')
    md = subprocess.run([sys.executable, "-c", script], cwd=sevenn_run, capture_output=True, text=True, timeout=600)
    assert md.returncode == 0, md.stderr[-3000:]
    assert float(md.stdout.split("DRIFT")[1]) < 0.05


def test_a_killed_relaxed_run_leaves_nothing_beside_the_users_input(tmp_path):
    """The copy of input.yaml without its relax section (sevenn refuses unknown sections) goes as soon as sevenn
    has read it: SIGKILL at the first optimizer step, as a job's time limit would, leaves only the user's files."""
    _sevenn_data(tmp_path)
    _input_yaml(tmp_path, "input.yaml", relax={"controller": "ace"})
    before = sorted(path.name for path in tmp_path.iterdir())
    killer = [sys.executable, str(Path(__file__).with_name("kill_at_step.py")), "1", "sevenn", "input.yaml", "-s"]
    result = subprocess.run(killer, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stdout[-3000:] + result.stderr[-3000:]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".equirelax-input")] == []
    assert set(before) <= set(os.listdir(tmp_path))


def test_relaxed_run_at_gamma_zero_trains_bit_for_bit_like_sevenn(sevenn_run, tmp_path):
    """sevenn's own CLI on the same input, and equirelax-sevenn with γ held at 0: the branches never act, so
    every weight of the best model must be sevenn's, to the bit (the data order and every step included)."""
    import shutil

    runs = {"plain": tmp_path / "plain", "zero": tmp_path / "zero"}
    for directory in runs.values():
        directory.mkdir()
        for name in ("train.extxyz", "valid.extxyz"):
            shutil.copy(sevenn_run / name, directory / name)
    _input_yaml(runs["plain"], "input.yaml")
    _input_yaml(runs["zero"], "input.yaml", relax={"controller": "fixed", "options": {"gamma": 0.0}})
    # one thread: with two, two runs of sevenn itself on a busy machine differ in the last bits (measured)
    plain = _sevenn_cli(runs["plain"], "input.yaml", command="sevenn", threads=1)
    zero = _sevenn_cli(runs["zero"], "input.yaml", threads=1)
    assert plain.returncode == 0 and zero.returncode == 0, (plain.stderr[-2000:], zero.stderr[-2000:])
    states = {name: torch.load(directory / "checkpoint_best.pth", map_location="cpu",
                               weights_only=False)["model_state_dict"] for name, directory in runs.items()}
    assert states["plain"].keys() == states["zero"].keys()  # the exported checkpoint is a plain one
    differ = {k: float((states["plain"][k] - states["zero"][k]).abs().max()) for k in states["plain"]
              if not torch.equal(states["plain"][k], states["zero"][k])}
    assert not differ, differ


def test_resuming_a_relaxed_sevenn_run_restores_the_controller(sevenn_run, tmp_path):
    import shutil

    for name in ("train.extxyz", "valid.extxyz"):
        shutil.copy(sevenn_run / name, tmp_path / name)
    shutil.copy(sevenn_run / "checkpoint_1.pth", tmp_path / "checkpoint_1.pth")
    _input_yaml(tmp_path, "resume.yaml", relax={"controller": "ace"})
    import yaml

    config = yaml.safe_load((tmp_path / "resume.yaml").read_text())
    config["train"]["continue"] = {"checkpoint": "checkpoint_1.pth", "reset_optimizer": False,
                                   "reset_scheduler": False, "reset_epoch": False}
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = _sevenn_cli(tmp_path, "resume.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    levels, steps = _levels(tmp_path / "checkpoint_2.pth")
    assert set(steps.values()) == {8}  # counted on from the checkpoint's 4, not from 0
    assert all(g == 0.0 for g in levels.values())  # so ACE closes at the same last step
    assert "Epoch 1/2" not in (tmp_path / "log.sevenn").read_text()


def test_compare_fine_tunes_sevennet_vanilla_and_relaxed(tmp_path):
    import json
    import math

    _sevenn_data(tmp_path)
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    tests = []
    for atoms in emt_configurations(4, seed=9, field=[0.0, 0.0, 0.3]):
        energy, forces = atoms.info.pop("REF_energy"), atoms.arrays.pop("REF_forces")
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        tests.append(atoms)
    write(tmp_path / "test.extxyz", tests)
    _input_yaml(tmp_path, "input.yaml", epoch=1)
    import yaml

    config = yaml.safe_load((tmp_path / "input.yaml").read_text())
    config["data"]["load_testset_path"] = ["test.extxyz"]
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([str(Path(sys.executable).parent / "equirelax"), "compare", "--host", "sevenn", "--config",
                             "input.yaml", "--controllers", "vanilla", "ace", "--out", "out", "--quiet"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    vanilla, ace = results["runs"]
    assert results["test_configurations"] == 4
    for run in (vanilla, ace):
        assert run["status"] == "ok", run["error"]
        equivariant = run["test"]["equivariant"]
        assert math.isfinite(equivariant["force_mae_mev_per_a"]) and equivariant["force_mae_mev_per_a"] > 1
        assert equivariant["equivariance_error"]["forces"] < 1e-4  # float32
        assert run["curves"]["epoch"] == [1] and run["curves"]["val_force_mae"][0] > 0
    assert set(ace["gamma"]) == set(SELF_INTERACTIONS) and all(g == 0.0 for g in ace["gamma"].values())
    assert ace["curves"]["gamma"]["0_self_interaction_1.linear"] == [[1, 0.0]]
    # ACE closed at the budget's end: the exported and relaxed models predict the same
    assert ace["test"]["relaxed"]["force_mae_mev_per_a"] == pytest.approx(
        ace["test"]["equivariant"]["force_mae_mev_per_a"], rel=1e-4)


def test_recm_gives_each_structure_of_a_sevenn_batch_to_one_probe_map_whatever_the_batch(sevennet, probe_sides):
    """SevenNet's batches keep positions and each atom's structure as ``pos`` and ``batch``: every atom of a
    structure on one side in every relaxed layer, the same side when the structures come in another order."""
    import copy

    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    from torch_geometric.data import Batch

    model = copy.deepcopy(sevennet).train()
    model.set_is_batch_data(True)
    handle = equirelax.relax(model, "recm", adapter="sevenn", total_steps=100)
    frames = emt_configurations(6, seed=4)
    graphs = [AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(atoms, 5.0)) for atoms in frames]
    split = []
    for order in (list(range(6)), [4, 1, 5, 0, 3, 2]):
        batch = Batch.from_data_list([graphs[i] for i in order])
        sides = probe_sides(handle, lambda: model(batch.clone()), batch["batch"])
        split.append([{order[k]: side for k, side in per_layer.items()} for per_layer in sides.values()])
    first = split[0][0]
    assert len(split[0]) == 10 and all(per_layer == first for run in split for per_layer in run)
    assert 0 < sum(first.values()) < 6
