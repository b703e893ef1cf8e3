"""``equirelax compare`` end to end on a tiny budget: the host's own training for every run, one report.

The evaluation is checked against the host's own test metrics (MACE's TEST
error table, NequIP's test0 metrics), a failing run must show up in the table
without stopping the others, and every number in results.json must be finite.
"""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from equirelax.datasets.emt import write_emt_dataset

EQUIRELAX = str(Path(sys.executable).parent / "equirelax")
FIELD = [0.0, 0.0, 0.3]


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def _compare(directory: Path, *arguments):
    return subprocess.run([EQUIRELAX, "compare", *arguments, "--out", "out", "--quiet"], cwd=directory,
                          capture_output=True, text=True, timeout=900)


def _check_ok_run(run, layers: int, epochs: int):
    assert run["status"] == "ok", run["error"]
    assert all(math.isfinite(x) for x in _numbers(run["test"]))
    equivariant = run["test"]["equivariant"]
    assert equivariant["equivariance_error"]["forces"] < 1e-10
    assert 1.0 < equivariant["force_mae_mev_per_a"] < equivariant["force_rmse_mev_per_a"] < 5000
    assert run["seconds_per_epoch"] > 0 and run["peak_memory_mb"] > 100
    assert run["curves"]["epoch"][-1] == epochs
    if run["relaxed_run"]:
        assert run["test"]["relaxed"]["equivariance_error"]["forces"] > 1e-6  # the branches are in it
        assert len(run["gamma"]) == layers and all(0.0 <= g <= 1.5 for g in run["gamma"].values())
        assert all(len(points) >= epochs for points in run["curves"]["gamma"].values())
    else:
        assert "relaxed" not in run["test"] and run["gamma"] == {}


def _check_report_files(out: Path, results: dict):
    report = (out / "report.md").read_text()
    for run in results["runs"]:
        assert f"| {run['name']} | {'ok' if run['status'] == 'ok' else '**failed**'}" in report
    for name in ("validation.png", "gamma.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- MACE
MACE_CONFIG = {
    "name": "tiny", "seed": 3, "train_file": "train.xyz", "valid_fraction": 0.2, "test_file": "test.xyz",
    "E0s": "average", "model": "MACE", "hidden_irreps": "8x0e + 8x1o", "r_max": 4.0, "num_radial_basis": 4,
    "num_cutoff_basis": 3, "max_L": 1, "correlation": 2, "num_interactions": 2, "batch_size": 5,
    "valid_batch_size": 8, "max_num_epochs": 2, "device": "cpu", "default_dtype": "float64", "eval_interval": 1,
    "energy_weight": 1.0, "forces_weight": 10.0, "error_table": "PerAtomMAE",
}


def _mace_test_table(run_dir: Path) -> tuple[float, float]:
    log = next(p for p in (run_dir / "logs").glob("*.log") if not p.name.endswith("_debug.log")).read_text()
    row = next(line for line in log.split("Error-table on TEST")[-1].splitlines() if "Default_Default" in line)
    energy, forces = (float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)[:2])
    return energy, forces


def test_mace_compare_reports_every_run_and_a_failed_one(tmp_path):
    pytest.importorskip("mace")
    write_emt_dataset(tmp_path / "train.xyz", 25, seed=0, field=FIELD)
    write_emt_dataset(tmp_path / "test.xyz", 6, seed=1, field=FIELD)
    (tmp_path / "mace.yaml").write_text(yaml.safe_dump(MACE_CONFIG))
    # a CR schedule longer than training: MACE's run stops with equirelax's message, the others go on; RECM
    # without a probing step in the run keeps γ at its start (1), so its relaxed model has branches to evaluate
    # (over 2 epochs its gap may well measure 0 on this data, and then its relaxed model is the equivariant one)
    result = _compare(tmp_path, "--host", "mace", "--config", "mace.yaml", "--controllers", "vanilla", "lora", "cr",
                      "recm", "field-input",
                      "--controller-options", '{"cr": {"epochs": 50}, "recm": {"probe_every": 1000}}')
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in results["runs"]] == ["vanilla", "lora", "cr", "recm", "field-input"]
    vanilla, lora, cr, recm, field_input = results["runs"]
    assert cr["status"] == "failed" and "schedule runs over 50 epochs" in cr["error"]
    for run in (vanilla, lora, recm, field_input):  # field-input: equivariant with the field rotated too
        _check_ok_run(run, layers=4, epochs=2)
    # MACE's own LoRA fine-tuning as a row: MACE injected and merged its adapters, compare evaluated its saved model
    lora_log = (out / "runs" / "lora" / "output.log").read_text()
    assert "Injecting LoRA layers" in lora_log and "Merging LoRA weights into base model" in lora_log
    assert lora["test"]["equivariant"]["force_mae_mev_per_a"] == pytest.approx(
        _mace_test_table(out / "runs" / "lora")[1], abs=0.051)
    assert lora["test"]["equivariant"]["force_mae_mev_per_a"] != vanilla["test"]["equivariant"]["force_mae_mev_per_a"]
    assert "Baseline `lora` (MACE's own LoRA fine-tuning" in (out / "report.md").read_text()
    # the field given to MACE as an input: its weights trained, and MACE's own TEST table (its loaders read the
    # field) is compare's evaluation (which reads it from the test file) of the saved model
    saved = torch.load(out / "runs" / "field-input" / "field-input.model", weights_only=False)
    assert saved.products[0].field_weight.abs().max() > 1e-4
    assert field_input["test"]["equivariant"]["force_mae_mev_per_a"] == pytest.approx(
        _mace_test_table(out / "runs" / "field-input")[1], abs=0.051)
    assert field_input["test"]["equivariant"]["force_mae_mev_per_a"] != \
        vanilla["test"]["equivariant"]["force_mae_mev_per_a"]
    assert "Baseline `field-input` (MACE given the structure's external field" in (out / "report.md").read_text()
    _check_report_files(out, results)
    assert "| cr | **failed**: exit code 1: equirelax: the cr schedule runs over 50 epochs" in result.stdout
    assert str(out / "report.md") in result.stdout

    # the same evaluation as MACE's own TEST table for the model MACE saved (1 decimal there)
    energy, forces = _mace_test_table(out / "runs" / "vanilla")
    assert vanilla["test"]["equivariant"]["force_mae_mev_per_a"] == pytest.approx(forces, abs=0.051)
    assert vanilla["test"]["equivariant"]["energy_mae_mev_per_atom"] == pytest.approx(energy, abs=0.051)
    _, relaxed_forces = _mace_test_table(out / "runs" / "recm")  # MACE tested the relaxed model
    assert recm["test"]["relaxed"]["force_mae_mev_per_a"] == pytest.approx(relaxed_forces, abs=0.051)

    # same data, seed and budget: the vanilla config is the user's own, the relaxed one adds relax: only
    user = yaml.safe_load((tmp_path / "mace.yaml").read_text())
    written = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
               for name in ("vanilla", "lora", "recm", "field-input")}
    assert written["lora"]["lora"] is True and "relax" not in written["lora"]
    assert written["field-input"]["field_input"] is True and "relax" not in written["field-input"]
    for config in written.values():
        assert {k: v for k, v in config.items() if k not in ("name", "relax", "lora", "field_input", "train_file",
                                                              "test_file")} == \
            {k: v for k, v in user.items() if k not in ("name", "train_file", "test_file")}
        assert config["train_file"] == str(tmp_path / "train.xyz")
    assert "relax" not in written["vanilla"]
    assert written["recm"]["relax"] == {"controller": "recm", "options": {"probe_every": 1000}}


# ------------------------------------------------------------------------- NequIP
def test_nequip_compare_matches_nequips_own_test_metrics(tmp_path):
    pytest.importorskip("nequip")
    from equirelax.plugins.nequip.config import model_config, training_config, write_config

    write_emt_dataset(tmp_path / "train.xyz", 25, seed=0, field=FIELD)
    write_emt_dataset(tmp_path / "test.xyz", 6, seed=1, field=FIELD)
    config = training_config("train.xyz", "test.xyz", model=model_config(num_features=8), epochs=2)
    write_config(tmp_path, "nequip", config)
    result = _compare(tmp_path, "--host", "nequip", "--config", "nequip.yaml", "--controllers", "vanilla",
                      "ace-resilient")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    vanilla, ace = results["runs"]
    _check_ok_run(vanilla, layers=4, epochs=2)
    _check_ok_run(ace, layers=4, epochs=2)
    _check_report_files(out, results)
    for run, model in ((vanilla, "equivariant"), (ace, "relaxed")):  # NequIP tests the checkpoint it trained
        with open(out / "runs" / run["name"] / "csv" / "version_0" / "metrics.csv") as handle:
            row = next(r for r in csv.DictReader(handle) if r.get("test0_epoch/forces_mae"))
        assert run["test"][model]["force_mae_mev_per_a"] == pytest.approx(1000 * float(row["test0_epoch/forces_mae"]),
                                                                          rel=1e-6)
    written = yaml.safe_load((out / "runs" / "ace-resilient" / "config.yaml").read_text())
    assert written["training_module"]["model"]["_target_"] == "equirelax.plugins.nequip.RelaxedModel"
    assert written["training_module"]["model"]["model"] == config["training_module"]["model"]



def test_nequip_compare_evaluates_on_nequips_own_test_split(tmp_path):
    """No test file: the config's split_dataset.test is the test set, the same configurations NequIP tests."""
    pytest.importorskip("nequip")
    from equirelax.plugins.nequip.config import model_config, training_config, write_config

    write_emt_dataset(tmp_path / "train.xyz", 25, seed=0, field=FIELD)
    config = training_config("train.xyz", model=model_config(num_features=8), epochs=1)
    config["data"]["split_dataset"].update({"train": 0.6, "val": 0.2, "test": 0.2})
    config["run"] = ["train", "test"]
    write_config(tmp_path, "nequip", config)
    result = _compare(tmp_path, "--host", "nequip", "--config", "nequip.yaml", "--controllers", "vanilla")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["test_file"] == f"NequIP's own test set (data.split_dataset.test of {tmp_path / 'train.xyz'})"
    assert results["test_configurations"] == 5
    (vanilla,) = results["runs"]
    with open(tmp_path / "out" / "runs" / "vanilla" / "csv" / "version_0" / "metrics.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r.get("test0_epoch/forces_mae"))
    assert vanilla["test"]["equivariant"]["force_mae_mev_per_a"] == pytest.approx(
        1000 * float(row["test0_epoch/forces_mae"]), rel=1e-6)