"""``nequip-train`` with the equirelax entries in its Hydra config, on generated EMT data.

Every run is NequIP's own CLI in a subprocess; checkpoints and the CSV log
are read back and checked by value.
"""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nequip")

import torch  # noqa: E402

from equirelax.datasets.emt import write_emt_dataset  # noqa: E402
from equirelax.plugins.nequip.config import training_config, write_config  # noqa: E402

CONTROLLERS = ["fixed", "cr", "ace", "ace-resilient", "recm"]
TYPE_NAMES = ["Al", "Cu"]
SMALL_MODEL = {"num_features": 8, "num_layers": 2}
EPOCHS = 2


def run_nequip_train(directory: Path, name: str, config: dict, *overrides) -> subprocess.CompletedProcess:
    write_config(directory, name, config)
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "nequip-train"), "-cp", str(directory), "-cn", name,
         f"hydra.run.dir={directory / f'out_{name}'}", *overrides],
        cwd=directory, capture_output=True, text=True, env=env,
    )


def nequip_train(directory: Path, name: str, config: dict, *overrides) -> Path:
    result = run_nequip_train(directory, name, config, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return directory / f"out_{name}"


def small_config(data: Path, **kwargs) -> dict:
    from equirelax.plugins.nequip.config import model_config

    kwargs.setdefault("epochs", EPOCHS)
    return training_config(str(data / "train.xyz"), str(data / "test.xyz"), model=model_config(**SMALL_MODEL),
                           **kwargs)


def logged(out: Path) -> list[dict]:
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def load(path):
    from equirelax.plugins.nequip import load_checkpoint_models

    return load_checkpoint_models(path)["sole_model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nequip_data")
    write_emt_dataset(directory / "train.xyz", 30, seed=0, field=[0.0, 0.0, 0.3])
    write_emt_dataset(directory / "test.xyz", 6, seed=1, field=[0.0, 0.0, 0.3])
    write_emt_dataset(directory / "sym.xyz", 30, seed=2)
    return directory


@pytest.fixture(scope="module")
def test_batch(data):
    from ase.io import read

    from equirelax.adapters.nequip import nequip_batch

    return nequip_batch(read(data / "test.xyz", ":"), TYPE_NAMES, 4.5)


@pytest.fixture(scope="module")
def runs(data):
    outs = {}
    for controller in CONTROLLERS:
        options = {"gamma": 0.5} if controller == "fixed" else {}
        config = small_config(data, relax={"controller": controller, "options": options, "init": "random"},
                              ema=controller == "recm")
        outs[controller] = nequip_train(data, controller.replace("-", "_"), config)
    return outs


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_each_controller_trains_logs_and_exports_an_equivariant_model(runs, test_batch, controller):
    from equirelax.adapters.nequip import nequip_equivariance_error

    out = runs[controller]
    rows = logged(out)
    gamma_keys = [k for k in rows[0] if k.startswith("equirelax/gamma/")]
    assert len(gamma_keys) == 4, gamma_keys  # linear_1 and linear_2 of both interaction layers
    for key in gamma_keys:
        values = column(rows, key)
        assert len(values) == EPOCHS and all(math.isfinite(v) for v in values)
    gammas = column(rows, gamma_keys[0])
    if controller == "fixed":
        assert gammas == [0.5, 0.5]
    if controller == "cr":
        assert gammas == [1.0, 0.0]  # triangular over the trainer's 2 epochs: θ(1) = 1, θ(2) = 0
    if controller.startswith("ace"):
        lambdas = [k for k in rows[0] if k.startswith("equirelax/ace/lambda/")]
        assert len(lambdas) == 4 and all(math.isfinite(v) for k in lambdas for v in column(rows, k))
    assert column(rows, "equirelax/equivariance_error/forces")

    exported = load(out / "exported.ckpt")
    assert not [type(m) for m in exported.modules() if type(m).__module__.startswith("equirelax")]

    error = nequip_equivariance_error(exported, dict(test_batch), n_rotations=2,
                                      generator=torch.Generator().manual_seed(0))
    assert error["forces"]["max"] < 1e-10 and error["energy"]["max"] < 1e-10, error


def test_the_run_says_what_it_relaxed_and_logs_gamma_in_train_log_by_short_names(runs):
    short = ["layer0_convnet.conv.linear_1", "layer0_convnet.conv.linear_2", "layer1_convnet.conv.linear_1",
             "layer1_convnet.conv.linear_2"]
    rows = logged(runs["ace"])
    assert sorted(k[len("equirelax/gamma/"):] for k in rows[0] if k.startswith("equirelax/gamma/")) == short
    assert column(rows, "equirelax/gamma_max")  # the progress bar's number
    log = (runs["ace"] / "train.log").read_text()
    assert f"equirelax: relaxed {short} with controller 'ace'" in log
    epochs = [line for line in log.splitlines() if "equirelax: epoch " in line]
    assert len(epochs) == EPOCHS and all("gamma/layer0_convnet.conv.linear_1=" in line for line in epochs)


def test_nequips_test_metrics_are_given_for_the_exported_model_too(runs, data, test_batch):
    from ase.io import read

    from equirelax.adapters.nequip import OUTPUT_KEYS

    out = runs["fixed"]  # γ = 0.5 with a random branch: the exported model predicts differently
    rows = logged(out)
    relaxed, exported = column(rows, "test0_epoch/forces_mae"), column(rows, "exported_test0_epoch/forces_mae")
    assert len(relaxed) == 1 and len(exported) == 1
    model = load(out / "exported.ckpt")
    predicted = model({k: v for k, v in dict(test_batch).items() if k not in OUTPUT_KEYS})["forces"].detach()
    reference = torch.cat([torch.as_tensor(a.arrays["REF_forces"]) for a in read(data / "test.xyz", ":")])
    assert exported[0] == pytest.approx(float((predicted - reference).abs().mean()), rel=1e-6)
    assert abs(exported[0] - relaxed[0]) > 1e-4
    line = next(line for line in (out / "train.log").read_text().splitlines()
                if "equirelax: test set 0, the exported model (branches merged, what exported.ckpt holds): " in line)
    assert f" forces_mae={exported[0]:.6g}," in line


def test_export_equals_the_projected_relaxed_model(runs, test_batch):
    from equirelax import RelaxHandle

    out = runs["fixed"]  # γ = 0.5 with a random branch: the merge has something to fold in
    relaxed = load(out / "best.ckpt")
    handle = RelaxHandle.attach(relaxed)
    assert handle.levels() and all(g == 0.5 for g in handle.levels().values())
    exported = load(out / "exported.ckpt")
    with handle.projected():
        expected = relaxed(dict(test_batch))
    got = exported(dict(test_batch))
    relaxed_out = relaxed(dict(test_batch))
    assert torch.allclose(got["total_energy"], expected["total_energy"], rtol=0, atol=1e-9)
    assert torch.allclose(got["forces"], expected["forces"], rtol=0, atol=1e-9)
    # and the branch's non-equivariant part did change the relaxed model's predictions
    assert (relaxed_out["forces"] - expected["forces"]).abs().max() > 1e-6


def test_exported_package_runs_in_nequip_ase_calculator_without_equirelax(runs, data, tmp_path):
    out = runs["recm"]  # EMA run: the package holds the EMA weights
    package = tmp_path / "model.nequip.zip"
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nequip-package"), "build",
                             str(out / "exported.ckpt"), str(package)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["equirelax"] = None  # the exported model must not need equirelax
        import numpy as np
        from ase.io import read
        from scipy.spatial.transform import Rotation
        from nequip.integrations.ase import NequIPCalculator
        calc = NequIPCalculator._from_saved_model({str(package)!r})
        atoms = read({str(data / "test.xyz")!r}, 0)
        atoms.calc = calc
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        R = Rotation.random(random_state=0).as_matrix()
        rotated = atoms.copy(); rotated.positions = atoms.positions @ R.T; rotated.calc = calc
        print(e, abs(rotated.get_potential_energy() - e), np.abs(rotated.get_forces() - f @ R.T).max())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    energy, energy_error, force_error = map(float, result.stdout.split())
    assert math.isfinite(energy) and energy_error < 1e-9 and force_error < 1e-9

    from ase.io import read

    from equirelax.adapters.nequip import nequip_batch

    exported = load(out / "exported.ckpt")
    expected = exported(nequip_batch([read(data / "test.xyz", 0)], TYPE_NAMES, 4.5))["total_energy"]
    assert abs(float(expected.detach()) - energy) < 1e-9


def test_relaxed_checkpoint_without_equirelax_installed_names_it(runs, not_installed):
    script = not_installed + textwrap.dedent(f"""
        from nequip.model import ModelFromCheckpoint
        from nequip.utils.global_state import set_global_state
        set_global_state()
        ModelFromCheckpoint({str(runs["ace"] / "best.ckpt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "equirelax.plugins.nequip.RelaxedModel" in result.stderr, result.stderr[-2000:]
    assert "No module named 'equirelax'" in result.stderr, result.stderr[-2000:]


def test_relaxed_checkpoint_packages_frozen_and_runs_md_without_equirelax(runs, data, tmp_path, not_installed):
    """``nequip-package`` of a relaxed checkpoint: the package holds the relaxed model frozen (γ and branches kept,
    ``equirelax.core.frozen`` inside the package) and NequIP's ASE calculator runs it, 20 MD steps included, where
    equirelax is not installed; energies and forces equal the relaxed model's."""
    from ase.io import read

    from equirelax.adapters.nequip import nequip_batch

    package = tmp_path / "relaxed.nequip.zip"
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nequip-package"), "build",
                             str(runs["fixed"] / "best.ckpt"), str(package)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    carried = [n for n in zipfile.ZipFile(package).namelist() if "equirelax" in n and n.endswith(".py")]
    assert carried and all(n.endswith("equirelax/core/frozen.py") for n in carried), carried
    script = not_installed + textwrap.dedent(f"""
        import json
        import numpy as np
        from ase import units
        from ase.io import read
        from ase.md.verlet import VelocityVerlet
        from nequip.integrations.ase import NequIPCalculator
        calc = NequIPCalculator._from_saved_model({str(package)!r})
        frames = read({str(data / "test.xyz")!r}, ":")
        out = {{"energy": [], "forces": []}}
        for atoms in frames:
            atoms.calc = calc
            out["energy"].append(atoms.get_potential_energy())
            out["forces"].append(atoms.get_forces().tolist())
        atoms = frames[0]
        VelocityVerlet(atoms, 0.5 * units.fs).run(20)
        assert np.isfinite(atoms.get_forces()).all()
        print("OUT" + json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("OUT")[1])

    relaxed, exported = load(runs["fixed"] / "best.ckpt"), load(runs["fixed"] / "exported.ckpt")
    for i, atoms in enumerate(read(data / "test.xyz", ":")):
        batch = nequip_batch([atoms], TYPE_NAMES, 4.5)
        expected = relaxed(batch)
        assert abs(float(expected["total_energy"].detach()) - out["energy"][i]) <= 1e-9
        assert np.abs(expected["forces"].detach().numpy() - np.array(out["forces"][i])).max() <= 1e-9
        plain = exported(nequip_batch([atoms], TYPE_NAMES, 4.5))
        assert np.abs((expected["forces"] - plain["forces"]).detach().numpy()).max() > 1e-6  # branches act


def test_equirelax_deploy_for_nequip_names_nequip_package(runs):
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "equirelax"), "deploy", "--host", "nequip",
                             str(runs["fixed"] / "best.ckpt")], capture_output=True, text=True)
    assert result.returncode != 0
    assert f"nequip-package build {runs['fixed'] / 'best.ckpt'}" in result.stderr, result.stderr[-2000:]


def test_gamma_zero_trains_bit_for_bit_like_plain_nequip(data):
    plain = nequip_train(data, "plain", small_config(data))
    relaxed = nequip_train(data, "gamma0", small_config(
        data, relax={"controller": "fixed", "options": {"gamma": 0.0}, "init": "random"}))
    plain_state = torch.load(plain / "last.ckpt", weights_only=False)["state_dict"]
    relaxed_state = torch.load(relaxed / "last.ckpt", weights_only=False)["state_dict"]
    mapped = {k.replace(".base.", "."): v for k, v in relaxed_state.items()
              if ".branch." not in k and not k.endswith(".gamma") and ".ctrl_" not in k}
    model_keys = [k for k in plain_state if k.startswith("model.")]
    assert model_keys and set(model_keys) <= set(mapped)
    changed = [k for k in model_keys if not torch.equal(plain_state[k], mapped[k])]
    assert not changed, changed
    # the branches are random and non-zero: γ = 0 is what keeps the run identical
    branches = [v for k, v in relaxed_state.items() if ".branch." in k]
    assert branches and all(v.abs().max() > 0 for v in branches)


def test_run_killed_mid_epoch_resumes_the_uninterrupted_trajectory(data):
    """SIGKILL in the middle of epoch 3 (before an optimizer step), then ``++ckpt_path`` on the latest
    checkpoint (end of epoch 2): weights, γ and every RECM statistic end as in an uninterrupted run."""
    config = small_config(data, relax={"controller": "recm", "options": {"probe_every": 2}, "init": "random"},
                          epochs=4)
    config["data"]["train_dataloader"]["shuffle"] = False  # same batches in the resumed epochs
    config["run"] = ["train"]
    straight = nequip_train(data, "straight", config)
    write_config(data, "killed", config)
    steps_per_epoch = 24 // 4  # 30 configurations, 80% for training, batches of 4
    killed = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kill_at_step.py")), str(2 * steps_per_epoch + 3), "nequip",
         "-cp", str(data), "-cn", "killed", f"hydra.run.dir={data / 'out_killed'}"],
        cwd=data, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    first = data / "out_killed"
    assert torch.load(first / "last.ckpt", weights_only=False)["epoch"] == 1  # the last complete epoch
    resumed = nequip_train(data, "resumed", config, f"++ckpt_path={first / 'last.ckpt'}")
    a = torch.load(straight / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "last.ckpt", weights_only=False)
    assert a["epoch"] == b["epoch"]
    controller_keys = [k for k in a["state_dict"] if ".ctrl_" in k or k.endswith(".gamma")]
    assert any("ctrl_gap" in k or "ctrl_" in k for k in controller_keys)
    for key in a["state_dict"]:
        if key.startswith("model."):
            torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=1e-9, atol=1e-12,
                                       msg=key)
    # RECM measured (probe maps trained, gap statistics filled), so matching them is a real check
    assert any(k.endswith("probe_B") and a["state_dict"][k].abs().max() > 0 for k in a["state_dict"])
    assert all(float(a["state_dict"][k]) > 0 for k in a["state_dict"] if k.endswith("ctrl_gap_weight"))


def test_finetune_saved_model_starts_from_identical_predictions(data, test_batch):
    from equirelax.plugins.nequip import RelaxedModel

    pretrained = nequip_train(data, "pretrain", small_config(data, epochs=1)) / "best.ckpt"
    source = {"_target_": "nequip.model.ModelFromCheckpoint", "checkpoint_path": str(pretrained)}
    plain = load(pretrained)
    relaxed = RelaxedModel(source, controller="ace-resilient")["sole_model"]
    assert any("RelaxedLayer" in type(m).__name__ for m in relaxed.modules())
    a, b = plain(dict(test_batch)), relaxed(dict(test_batch))
    assert torch.equal(a["total_energy"], b["total_energy"]) and torch.equal(a["forces"], b["forces"])

    config = small_config(data, epochs=1)
    config["training_module"]["model"] = {"_target_": "equirelax.plugins.nequip.RelaxedModel",
                                          "controller": "ace-resilient", "model": source}
    config["trainer"]["callbacks"].append({"_target_": "equirelax.plugins.nequip.EquirelaxCallback"})
    out = nequip_train(data, "finetune", config)
    exported = load(out / "exported.ckpt")
    assert not any(type(m).__module__.startswith("equirelax") for m in exported.modules())


@pytest.mark.parametrize("case,message", [
    ("callback_without_relaxed_model", "found no relaxed layer"),
    ("cr_schedule_longer_than_training", "the trainer stops after max_epochs=2"),
    ("unknown_controller", "unknown controller 'acme'"),
    ("relaxed_model_without_callback", "no controller drives them: add `- _target_: "
                                       "equirelax.plugins.nequip.EquirelaxCallback` to trainer.callbacks"),
    ("options_not_a_mapping", "relax.options must be a mapping of controller options, got [1, 2]"),
])
def test_bad_nequip_configs_fail_with_a_clear_message(data, case, message):
    config = small_config(data)
    config["run"] = ["train"]
    if case == "callback_without_relaxed_model":
        config["trainer"]["callbacks"].append({"_target_": "equirelax.plugins.nequip.EquirelaxCallback"})
    elif case == "cr_schedule_longer_than_training":
        config = small_config(data, relax={"controller": "cr", "options": {"epochs": 5}})
    elif case == "relaxed_model_without_callback":
        config = small_config(data, relax={"controller": "ace"})
        callbacks = config["trainer"]["callbacks"]
        callbacks[:] = [c for c in callbacks if c["_target_"] != "equirelax.plugins.nequip.EquirelaxCallback"]
    elif case == "options_not_a_mapping":
        config = small_config(data, relax={"controller": "ace", "options": [1, 2]})
    else:
        config = small_config(data, relax={"controller": "acme"})
    result = run_nequip_train(data, case, config)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout, (result.stderr + result.stdout)[-3000:]


@pytest.fixture(scope="module")
def plain_package(runs, data, tmp_path_factory):
    """A packaged plain NequIP model (package-local e3nn/NequIP classes), from an exported checkpoint."""
    package = tmp_path_factory.mktemp("package") / "plain.nequip.zip"
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nequip-package"), "build",
                             str(runs["fixed"] / "exported.ckpt"), str(package)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return package


def test_relax_a_packaged_model_and_merge_back(plain_package, test_batch):
    from nequip.model import ModelFromPackage

    from equirelax import RelaxHandle
    from equirelax.adapters.nequip import nequip_equivariance_error
    from equirelax.plugins.nequip import ExportedModel, RelaxedModel

    source = {"_target_": "nequip.model.ModelFromPackage", "package_path": str(plain_package)}
    plain = ModelFromPackage(str(plain_package))["sole_model"]
    relaxed = RelaxedModel(source, controller="fixed", branch="linear", options={"gamma": 0.5})["sole_model"]
    handle = RelaxHandle.attach(relaxed)
    assert len(handle.layers) == 4  # package-local e3nn Linear layers are recognised
    a, b = plain(dict(test_batch)), relaxed(dict(test_batch))
    assert torch.equal(a["forces"], b["forces"])  # zero-initialised branches: identical at step 0
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.branch.weight.normal_(0.0, 0.2)
    with handle.projected():
        expected = relaxed(dict(test_batch))["forces"]
    from equirelax import export

    merged = export(relaxed)
    assert not any(type(m).__module__.startswith("equirelax") for m in merged.modules())
    torch.testing.assert_close(merged(dict(test_batch))["forces"], expected, rtol=0, atol=1e-9)
    error = nequip_equivariance_error(merged, dict(test_batch), n_rotations=2)
    assert error["forces"]["max"] < 1e-10
    built = ExportedModel({"_target_": "equirelax.plugins.nequip.RelaxedModel", "controller": "ace",
                           "model": source})["sole_model"]
    assert torch.equal(built(dict(test_batch))["forces"], a["forces"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nequip-compile (AOTInductor) is a GPU-machine check")
def test_exported_package_compiles_with_nequip_compile(plain_package, tmp_path):
    out = tmp_path / "model.nequip.pt2"
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nequip-compile"), str(plain_package),
                             str(out), "--mode", "aotinductor", "--device", "cuda", "--target", "ase"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 0


def test_recm_gives_each_structure_of_a_nequip_batch_to_one_probe_map_whatever_the_batch(runs, data, probe_sides):
    """NequIP's batches keep positions and each atom's structure as ``pos`` and ``batch``: every atom of a
    structure on one side in every relaxed layer, the same side when the structures come in another order."""
    from ase.io import read

    from equirelax import RelaxHandle
    from equirelax.adapters.nequip import nequip_batch

    model = load(runs["recm"] / "best.ckpt").train()
    handle = RelaxHandle.attach(model)
    frames = read(data / "train.xyz", ":8")
    split = []
    for order in (list(range(8)), [5, 2, 7, 0, 3, 6, 1, 4]):
        batch = nequip_batch([frames[i] for i in order], TYPE_NAMES, 4.5)
        sides = probe_sides(handle, lambda: model(dict(batch)), batch["batch"])
        split.append([{order[k]: side for k, side in per_layer.items()} for per_layer in sides.values()])
    first = split[0][0]
    assert len(split[0]) == len(handle.layers) and all(per_layer == first for run in split for per_layer in run)
    assert 0 < sum(first.values()) < 8
