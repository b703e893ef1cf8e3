"""equirelax-mace-train: MACE's own CLI and YAML, with a relax: section (MACE environment only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("mace")

from equirelax.datasets.emt import write_emt_dataset  # noqa: E402

CLI = Path(sys.executable).parent / "equirelax-mace-train"
MACE_CLI = Path(sys.executable).parent / "mace_run_train"

BASE = {
    "name": "tiny", "seed": 3, "train_file": "train.xyz", "valid_fraction": 0.2, "test_file": "test.xyz",
    "E0s": "average", "model": "MACE", "hidden_irreps": "8x0e + 8x1o", "r_max": 4.0, "num_radial_basis": 4,
    "num_cutoff_basis": 3, "max_L": 1, "correlation": 2, "num_interactions": 2, "batch_size": 20,
    "valid_batch_size": 8, "max_num_epochs": 2, "device": "cpu", "default_dtype": "float64", "eval_interval": 1,
    "energy_weight": 1.0, "forces_weight": 10.0,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("emt")
    write_emt_dataset(root / "train.xyz", 25, seed=0, field=[0.0, 0.0, 0.3])
    write_emt_dataset(root / "test.xyz", 6, seed=1, field=[0.0, 0.0, 0.3])
    return root


def run(cli, workdir, data_dir, config, *extra, env=None):
    cli = [str(c) for c in cli] if isinstance(cli, list) else [str(cli)]
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("train.xyz", "test.xyz"):
        target = workdir / name
        if not target.exists():
            target.symlink_to(data_dir / name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([*cli, "--config", "config.yaml", *extra], cwd=workdir, capture_output=True,
                          text=True, timeout=600, env=None if env is None else {**os.environ, **env})


def results(workdir):
    lines = (next((workdir / "results").glob("*_train.txt"))).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def exported_error(workdir, stem="tiny"):
    model = torch.load(workdir / f"{stem}.model", weights_only=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # MACE builds batches in the default dtype; the model is float64
    try:
        return _exported_error(model, workdir)
    finally:
        torch.set_default_dtype(previous)


def _exported_error(model, workdir):
    from ase.io import read
    from mace.tools import AtomicNumberTable

    from equirelax.adapters.mace import mace_batch, mace_equivariance_error

    table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    batch = mace_batch([read(workdir / "test.xyz", 0)], table, cutoff=4.0)
    assert not any(type(m).__module__.startswith("equirelax") for m in model.modules())
    return mace_equivariance_error(model, batch, n_rotations=3)


@pytest.mark.parametrize(
    "controller,options",
    [("fixed", {}), ("cr", {}), ("ace", {}), ("ace-resilient", {}), ("recm", {"probe_every": 2})],
)
def test_each_controller_trains_logs_gamma_and_exports_equivariant_mace(tmp_path, data_dir, controller, options):
    config = {**BASE, "relax": {"controller": controller, "options": options}}
    result = run(CLI, tmp_path, data_dir, config)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in results(tmp_path) if r.get("mode") == "eval"]
    gammas = [r["equirelax/gamma/interactions.0.linear"] for r in rows]
    assert len(gammas) >= 2 and all(isinstance(g, float) for g in gammas)
    assert "equirelax/equivariance_error/forces" in rows[-1]
    if controller == "cr":
        assert gammas[-1] == 0.0  # the schedule over max_num_epochs ends at θ = 0
    error = exported_error(tmp_path)
    assert error["energy"]["max"] < 1e-10 and error["forces"]["max"] < 1e-10


def test_config_without_relax_trains_exactly_like_mace_run_train_and_so_does_a_relaxed_run_at_gamma_zero(
        tmp_path, data_dir):
    # 4 batches an epoch: a shifted shuffle changes every step; 2 epochs: the evaluation between them (with
    # equirelax's equivariance check) must not change the second epoch either
    shuffled = {**BASE, "batch_size": 5, "max_num_epochs": 2}
    ours = run(CLI, tmp_path / "ours", data_dir, shuffled)
    theirs = run(MACE_CLI, tmp_path / "theirs", data_dir, shuffled)
    # γ held at 0: the branches never act, so the run must see MACE's batches in MACE's order (a probe batch
    # drawn from the loader once shifted every epoch's shuffle: the first step's loss differed by 10%) and
    # compute what MACE computes, to the bit (the equivariance check's extra calls once moved the point where
    # TorchScript optimizes e3nn's scripted modules, and the optimized graphs round differently)
    at_zero = {**shuffled, "relax": {"controller": "fixed", "options": {"gamma": 0.0}}}
    zero = run(CLI, tmp_path / "zero", data_dir, at_zero)
    assert all(r.returncode == 0 for r in (ours, theirs, zero)), [r.stderr[-2000:] for r in (ours, theirs, zero)]
    a = torch.load(tmp_path / "ours" / "tiny.model", weights_only=False).state_dict()
    b = torch.load(tmp_path / "theirs" / "tiny.model", weights_only=False).state_dict()
    c = torch.load(tmp_path / "zero" / "tiny.model", weights_only=False).state_dict()  # exported: branches merged
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a), [k for k in a if not torch.equal(a[k], c[k])]
    steps = [[r["loss"] for r in results(tmp_path / name) if r.get("mode") == "opt"] for name in ("ours", "zero")]
    assert len(steps[0]) == 8 and steps[0] == steps[1]
    assert not (tmp_path / "ours" / "tiny_relaxed.model").exists()


def test_run_killed_mid_epoch_resumes_the_controller_trajectory(tmp_path, data_dir):
    """SIGKILL inside epoch 4 (after its backward, before the optimizer step), then ``--restart_latest``.
    MACE restarts *at* the checkpointed epoch (the 3rd; it trains that epoch again), so the killed run's 3
    epochs plus the restart's 2 are 5 epochs of training: the λ trajectory must equal an uninterrupted
    5-epoch run's (full-batch data, so shuffling cannot change it). The papers' gradient form of ACE: its
    dynamics do not depend on the run's length, which differs between the two runs here."""
    relax = {"controller": "ace-resilient", "options": {"dual": "gradient", "dual_lr": 0.05}}
    full = run(CLI, tmp_path / "full", data_dir, {**BASE, "max_num_epochs": 5, "relax": relax})
    assert full.returncode == 0, full.stderr[-3000:]
    config = {**BASE, "max_num_epochs": 4, "save_all_checkpoints": True, "relax": relax}
    killer = [sys.executable, str(Path(__file__).with_name("kill_at_step.py")), "4", "mace"]
    (tmp_path / "tmp").mkdir()
    first = run(killer, tmp_path / "resumed", data_dir, config, env={"TMPDIR": str(tmp_path / "tmp")})
    assert first.returncode == -9, first.stderr[-3000:]
    assert list((tmp_path / "tmp").glob("mace-config-*")) == []  # MACE's copy of the config, without relax:
    second = run(CLI, tmp_path / "resumed", data_dir, config, "--restart_latest")
    assert second.returncode == 0, second.stderr[-3000:]
    key = "equirelax/ace/lambda/interactions.0.linear"
    uninterrupted = [r[key] for r in results(tmp_path / "full") if r.get("mode") == "eval"]
    resumed = [r[key] for r in results(tmp_path / "resumed") if r.get("mode") == "eval"]
    # the restart's first evaluation (before training) reports the checkpointed state: the same λ again
    assert resumed[4] == resumed[3] > 0
    del resumed[4]
    assert len(resumed) == len(uninterrupted) == 6
    assert resumed == pytest.approx(uninterrupted, rel=1e-9, abs=1e-12)
    assert uninterrupted[-1] > uninterrupted[3]  # the dual variable kept moving after the restart point


def test_restart_from_a_checkpoint_of_another_relax_configuration_says_what_differs(tmp_path, data_dir):
    first = run(CLI, tmp_path, data_dir, {**BASE, "max_num_epochs": 1, "relax": {"controller": "recm"}})
    assert first.returncode == 0, first.stderr[-3000:]
    other_controller = run(CLI, tmp_path, data_dir, {**BASE, "relax": {"controller": "ace"}}, "--restart_latest")
    assert other_controller.returncode != 0
    assert "comes from a different relax configuration; controller: checkpoint has 'recm', this model has 'ace'" \
        in other_controller.stderr, other_controller.stderr[-2000:]
    other_targets = run(CLI, tmp_path, data_dir, {**BASE, "relax": {"controller": "recm",
                                                                  "targets": ["products.*.linear"]}},
                        "--restart_latest")
    assert other_targets.returncode != 0
    assert "layers: checkpoint has ['interactions.0.linear', 'interactions.1.linear', 'products.0.linear'" \
        in other_targets.stderr, other_targets.stderr[-2000:]
    plain = tmp_path / "plain"
    assert run(CLI, plain, data_dir, {**BASE, "max_num_epochs": 1}).returncode == 0
    relaxed_restart = run(CLI, plain, data_dir, {**BASE, "relax": {"controller": "recm"}}, "--restart_latest")
    assert relaxed_restart.returncode != 0
    assert "was written without relaxation (plain MACE)" in relaxed_restart.stderr, relaxed_restart.stderr[-2000:]
    # (the same configuration restarting: test_run_killed_mid_epoch_resumes_the_controller_trajectory)


@pytest.mark.parametrize(
    "relax,message",
    [({"controller": "acme"}, "unknown controller 'acme'"),
     ({"controller": "ace", "targets": ["interactions.*.nothing"]}, "matched no relaxable layer"),
     ({"controller": "ace", "colour": "blue"}, "unknown key(s) ['colour']"),
     ({"controller": "cr", "options": {"epochs": 50}}, "max_num_epochs=2")],
)
def test_bad_relax_section_is_a_clear_error(tmp_path, data_dir, relax, message):
    result = run(CLI, tmp_path, data_dir, {**BASE, "relax": relax})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("flags,message", [
    ({"lora": True}, "--lora and a relax section both add a trainable branch"),
    ({"enable_cueq": True}, "--enable_cueq/--enable_oeq rebuild MACE's model"),
    ({"freeze": 5}, "--freeze 5 freezes MACE's ['interactions', 'node_embedding'], which hold the relaxed layers"),
])
def test_mace_fine_tuning_flags_that_undo_relaxation_stop_with_a_clear_error(tmp_path, data_dir, flags, message):
    result = run(CLI, tmp_path, data_dir, {**BASE, **flags, "relax": {"controller": "ace"}})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("*.model"))  # stopped before training


def test_foundation_model_fine_tuning_starts_from_identical_predictions(tmp_path, data_dir):
    """--foundation_model with a local .model: the relaxed run's initial validation equals vanilla fine-tuning's."""
    pre = run(CLI, tmp_path / "pre", data_dir, {**BASE, "name": "pre", "max_num_epochs": 1})
    assert pre.returncode == 0, pre.stderr[-3000:]
    fine_tune = {**BASE, "max_num_epochs": 1, "foundation_model": str(tmp_path / "pre" / "pre.model"),
                 "multiheads_finetuning": False, "E0s": "foundation"}
    vanilla = run(CLI, tmp_path / "vanilla", data_dir, fine_tune)
    relaxed = run(CLI, tmp_path / "relaxed", data_dir, {**fine_tune, "relax": {"controller": "recm"}})
    assert vanilla.returncode == 0 and relaxed.returncode == 0, (vanilla.stderr[-2000:], relaxed.stderr[-2000:])

    def initial(workdir):
        rows = [r for r in results(workdir) if r.get("mode") == "eval"]
        return {k: v for k, v in rows[0].items() if k in ("loss", "mae_e", "mae_f", "rmse_e", "rmse_f")}

    assert initial(tmp_path / "relaxed") == initial(tmp_path / "vanilla")
    assert initial(tmp_path / "vanilla")["rmse_f"] > 0


MD_SCRIPT = """
import sys
sys.modules["equirelax"] = None  # the exported model must not need equirelax
import numpy as np
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet
from mace.calculators import MACECalculator

atoms = read("test.xyz", 0)
atoms.calc = MACECalculator(model_paths="tiny.model", device="cpu", default_dtype="float64")
start = atoms.get_potential_energy() + atoms.get_kinetic_energy()
VelocityVerlet(atoms, 0.5 * units.fs).run(20)
end = atoms.get_potential_energy() + atoms.get_kinetic_energy()
assert np.isfinite(atoms.get_forces()).all()
print("MD-OK", abs(end - start))
"""


def test_exported_model_runs_ase_md_without_equirelax(tmp_path, data_dir, not_installed):
    result = run(CLI, tmp_path, data_dir, {**BASE, "relax": {"controller": "recm"}})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tiny_compiled.model").exists()
    md = subprocess.run([sys.executable, "-c", MD_SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert md.returncode == 0, md.stderr[-3000:]
    drift = float(md.stdout.split("MD-OK")[1])
    assert drift < 0.05  # eV over 20 steps: the forces are the energy's gradient
    # the relaxed model itself needs equirelax, and says so where it is not installed
    relaxed = subprocess.run([sys.executable, "-c", not_installed + LOAD_RELAXED], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert relaxed.returncode != 0
    assert "No module named 'equirelax'" in relaxed.stderr, relaxed.stderr[-2000:]


def test_stage_two_runs_inside_the_controllers_budget_and_both_models_are_exported(tmp_path, data_dir):
    """MACE's stage two (``swa``: other loss weights and learning rate from ``start_swa``) with ``relax:``: ACE's
    budget spans both stages, so the stage-two model ends at γ = 0; both saved models are exported plain and
    equivariant, each beside its relaxed model."""
    from equirelax.core.handle import RelaxHandle

    config = {**BASE, "max_num_epochs": 4, "swa": True, "start_swa": 3, "relax": {"controller": "ace"}}
    result = run(CLI, tmp_path, data_dir, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Stage Two is activated" in result.stderr + result.stdout
    levels = {}
    for stem in ("tiny", "tiny_stagetwo"):
        relaxed = torch.load(tmp_path / f"{stem}_relaxed.model", weights_only=False)
        levels[stem] = RelaxHandle.attach(relaxed).levels()
        assert exported_error(tmp_path, stem)["forces"]["max"] < 1e-10
        assert (tmp_path / f"{stem}_compiled.model").exists()
    assert all(abs(g) < 1e-12 for g in levels["tiny_stagetwo"].values()), levels
    assert any(abs(g) > 1e-3 for g in levels["tiny"].values()), levels  # stage one's model: before the close


LOAD_RELAXED = """
from mace.calculators import MACECalculator
MACECalculator(model_paths="tiny_relaxed.model", device="cpu", default_dtype="float64")
"""


DEPLOYED_SCRIPT = """
import json, sys
import numpy as np
import torch
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet
from mace import data
from mace.calculators import MACECalculator
from mace.tools import AtomicNumberTable, torch_geometric

frames = read("test.xyz", ":")
calculator = MACECalculator(model_paths="tiny_relaxed_compiled.model", device="cpu", default_dtype="float64")
out = {"energy": [], "forces": []}
for atoms in frames:
    atoms.calc = calculator
    out["energy"].append(atoms.get_potential_energy())
    out["forces"].append(atoms.get_forces().tolist())
atoms = frames[0].copy()
atoms.calc = calculator
start = atoms.get_total_energy()
VelocityVerlet(atoms, 0.5 * units.fs).run(20)
out["md_drift"] = abs(atoms.get_total_energy() - start)
assert np.isfinite(atoms.get_forces()).all()

sys.argv = ["create_lammps_model", "tiny_relaxed_compiled.model", "--head", "Default"]
from mace.cli.create_lammps_model import main
main()
lammps = torch.jit.load("tiny_relaxed_compiled.model-lammps.pt")
table = AtomicNumberTable([int(z) for z in lammps.atomic_numbers])
out["lammps_energy"] = []
torch.set_default_dtype(torch.float64)  # the converter's default --dtype
for atoms in frames:  # LAMMPS hands the model one system at a time
    item = data.AtomicData.from_config(data.config_from_atoms(atoms), z_table=table, cutoff=float(lammps.r_max))
    batch = next(iter(torch_geometric.dataloader.DataLoader([item], batch_size=1))).to_dict()
    result = lammps(batch, torch.ones(batch["positions"].shape[0], dtype=torch.float64))
    out["lammps_energy"].append(float(result["total_energy_local"].sum()))
print("OUT" + json.dumps(out))
"""


def test_relaxed_model_deploys_compiled_in_mace_calculator_md_and_lammps_without_equirelax(tmp_path, data_dir,
                                                                                           not_installed):
    """A run that ends relaxed also writes ``<name>_relaxed_compiled.model``: γ and branches kept, TorchScript. It
    runs in MACECalculator and 20 MD steps where equirelax is not installed, and MACE's LAMMPS converter takes it;
    energies and forces equal the relaxed model's."""
    from ase.io import read
    from mace.calculators import MACECalculator

    result = run(CLI, tmp_path, data_dir, {**BASE, "relax": {"controller": "fixed"}})
    assert result.returncode == 0, result.stderr[-3000:]
    deployed = subprocess.run([sys.executable, "-c", not_installed + DEPLOYED_SCRIPT], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    out = json.loads(deployed.stdout.split("OUT")[1])

    relaxed = MACECalculator(models=[torch.load(tmp_path / "tiny_relaxed.model", weights_only=False)], device="cpu",
                             default_dtype="float64")
    exported = MACECalculator(model_paths=str(tmp_path / "tiny.model"), device="cpu", default_dtype="float64")
    energies, forces, plain_energies = [], [], []
    for atoms in read(tmp_path / "test.xyz", ":"):
        atoms.calc = relaxed
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        atoms.calc = exported
        plain_energies.append(atoms.get_potential_energy())
    assert np.abs(np.array(out["energy"]) - energies).max() <= 1e-10
    assert max(np.abs(np.array(a) - b).max() for a, b in zip(out["forces"], forces)) <= 1e-10
    assert np.abs(np.array(out["lammps_energy"]) - energies).max() <= 1e-10
    assert np.abs(np.array(energies) - plain_energies).max() > 1e-6  # the branches act: not the exported model
    assert out["md_drift"] < 0.05  # eV over 20 steps: the forces are the energy's gradient

    # the same from the command line, for a relaxed .model of any run (export: none, or an older run)
    cli = subprocess.run([str(Path(sys.executable).parent / "equirelax"), "deploy", "--host", "mace",
                          "tiny_relaxed.model", "again.model"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-3000:]
    again = MACECalculator(model_paths=str(tmp_path / "again.model"), device="cpu", default_dtype="float64")
    atoms = read(tmp_path / "test.xyz", 0)
    atoms.calc = again
    assert abs(atoms.get_potential_energy() - energies[0]) <= 1e-10


def test_equirelax_data_and_pretrain_commands(tmp_path):
    from ase.io import read

    equirelax_cli = Path(sys.executable).parent / "equirelax"
    data = subprocess.run([str(equirelax_cli), "data", "emt-field", "f.xyz", "--n", "4", "--field", "0", "0", "0.2"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert data.returncode == 0, data.stderr
    frames = read(tmp_path / "f.xyz", ":")
    assert len(frames) == 4 and "REF_forces" in frames[0].arrays and "REF_energy" in frames[0].info
    bad = subprocess.run([str(equirelax_cli), "data", "emt", "x.xyz", "--n", "0"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--n must be a positive" in bad.stderr
    for flag, value in (("--n", "1"), ("--epochs", "0"), ("--n-test", "0")):
        refused = subprocess.run([str(equirelax_cli), "pretrain", "--host", "mace", "--out", "refused", flag, value],
                                 cwd=tmp_path, capture_output=True, text=True)
        assert refused.returncode == 2 and "pretrain needs --n ≥ 2" in refused.stderr, refused.stderr
        assert not (tmp_path / "refused").exists()  # stopped before writing anything
    pre = subprocess.run([str(equirelax_cli), "pretrain", "--host", "mace", "--out", "pre", "--n", "20",
                          "--epochs", "2", "--n-test", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert pre.returncode == 0, pre.stderr[-3000:]
    model = torch.load(tmp_path / "pre" / "pretrained.model", weights_only=False)
    assert type(model).__name__ in ("MACE", "ScaleShiftMACE")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # as MACE's foundation models are
    train, test = read(tmp_path / "pre" / "sym.xyz", ":"), read(tmp_path / "pre" / "sym_test.xyz", ":")
    assert len(train) == 20 and len(test) == 3
    assert not any(np.array_equal(a.positions, b.positions) for a in test for b in train if len(a) == len(b))
    # MACE's own error table, test rows included, is printed and kept beside the model
    table = (tmp_path / "pre" / "errors.md").read_text()
    assert "Error-table on TRAIN and VALID" in table and "Error-table on TEST" in table
    assert "MAE E / meV / atom" in table and "relative F MAE %" in table and "| Default_Default |" in table
    assert table in pre.stdout


def test_multihead_fine_tuning_with_an_empty_relax_section(tmp_path, data_dir):
    """A foundation model fine-tuned multihead with ``relax:`` left empty: the start-up says the defaults are used,
    γ is logged once per evaluation (not once per head), the outputs follow MACE's names and MACE's TEST table is
    given for the exported model too."""
    pre = run(CLI, tmp_path / "pre", data_dir, {**BASE, "name": "pre", "max_num_epochs": 1})
    assert pre.returncode == 0, pre.stderr[-3000:]
    config = {**BASE, "max_num_epochs": 1, "foundation_model": str(tmp_path / "pre" / "pre.model"),
              "pt_train_file": "train.xyz", "E0s": "foundation", "relax": None}
    result = run(CLI, tmp_path / "mh", data_dir, config)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "Using heads: ['Default', 'pt_head']" in log
    assert "the relax section is empty, so every relax setting is its default (controller 'ace'" in log
    evaluations = [line for line in log.splitlines() if "head: Default, loss=" in line]
    gamma_lines = [line for line in log.splitlines() if "INFO: equirelax: gamma/interactions.0.linear=" in line]
    assert len(evaluations) == 2 and len(gamma_lines) == len(evaluations)

    directory = tmp_path / "mh"
    plain = torch.load(directory / "tiny.model", weights_only=False)
    relaxed = torch.load(directory / "tiny_relaxed.model", weights_only=False)
    assert not any(type(m).__module__.startswith("equirelax") for m in plain.modules())
    assert any(type(m).__name__ == "RelaxedLayer" for m in relaxed.modules())
    assert (directory / "tiny_compiled.model").exists()

    test_tables = log.split("Error-table on TEST")[-1]
    assert "equirelax: relaxed model (tiny_relaxed.model)" in test_tables
    exported_table = test_tables.split("equirelax: exported model (tiny.model, branches merged")[1]
    row = next(line for line in exported_table.splitlines() if "Default_Default" in line)
    table_rmse_f = float(row.split("|")[3])
    from ase.io import read
    from mace.calculators import MACECalculator

    calculator = MACECalculator(model_paths=str(directory / "tiny.model"), device="cpu", default_dtype="float64")
    errors = []
    for atoms in read(directory / "test.xyz", ":"):
        reference = atoms.arrays["REF_forces"]
        atoms.calc = calculator
        errors.append((atoms.get_forces() - reference).ravel())
    rmse_f = 1000 * float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))
    assert table_rmse_f == pytest.approx(rmse_f, abs=0.051)  # MACE's table has one decimal

    # the exported model keeps every head; MACECalculator(head=...) picks one, equirelax not needed
    assert sorted(plain.heads) == ["Default", "pt_head"]
    atoms = read(directory / "test.xyz", 0)
    energies = {}
    for head in plain.heads:
        atoms.calc = MACECalculator(model_paths=str(directory / "tiny.model"), device="cpu", default_dtype="float64",
                                    head=head)
        energies[head] = atoms.get_potential_energy()
    assert all(np.isfinite(list(energies.values()))) and energies["Default"] != energies["pt_head"]
