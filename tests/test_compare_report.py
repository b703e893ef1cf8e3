"""``equirelax compare``: the report is computed from the numbers, and bad input stops it before any training."""

import json
import math

import pytest
import yaml

from equirelax import compare
from equirelax.compare.engine import _json_run
from equirelax.core.hosts import HostOptions
from equirelax.plugins.mace.host import MaceHost
from equirelax.datasets.emt import write_emt_dataset


def _run(name, force_mae, relaxed_mae=None, gamma=None, status="ok", error=None):
    def metrics(value, eq_error):
        return {"energy_mae_mev_per_atom": 1.0, "energy_rmse_mev_per_atom": 1.5, "force_mae_mev_per_a": value,
                "force_rmse_mev_per_a": 1.3 * value, "equivariance_error": {"energy": eq_error, "forces": eq_error}}

    test = {}
    if status == "ok":
        test["equivariant"] = metrics(force_mae, 2e-15)
        if relaxed_mae is not None:
            test["relaxed"] = metrics(relaxed_mae, 0.2)
    return {"name": name, "controller": None if name == "vanilla" else name, "relaxed_run": name != "vanilla",
            "directory": f"/out/runs/{name}", "status": status, "error": error, "wall_seconds": 10.0,
            "seconds_per_epoch": 0.5, "peak_memory_mb": 600.0, "peak_gpu_memory_mb": None, "model_epoch": 3,
            "gamma": gamma or {}, "test": test,
            "curves": {"epoch": [0, 1, 2], "val_force_mae": [150.0, 130.0, force_mae],
                       "gamma": {layer: [[0, 1.0], [1, 0.5], [2, value]] for layer, value in (gamma or {}).items()}}}


def _results(*runs):
    return {"host": "mace", "config": "/c.yaml", "test_file": "/t.xyz", "test_configurations": 40, "epochs": 3,
            "seed": 3, "controllers": [r["name"] for r in runs], "controller_options": {}, "runs": list(runs)}


GAMMA_KEPT = {"model.interactions.0.linear": 0.8, "model.products.0.linear": 0.6}
GAMMA_ZERO = {"model.interactions.0.linear": 0.0, "model.products.0.linear": 0.0}


def test_reading_names_the_runs_that_beat_vanilla_with_their_margin():
    lines = compare.reading(_results(_run("vanilla", 120.0), _run("recm", 125.0, 108.0, GAMMA_KEPT),
                                     _run("cr", 121.0, 121.0, GAMMA_ZERO)))
    text = "\n".join(lines)
    assert "Lowest test force MAE: `recm` (relaxed model), 108.0 meV/Å." in text
    assert "Relaxed models vs vanilla: below vanilla: `recm` (-10.0%); not below vanilla: `cr` (+0.8%)." in text
    assert "Exported (exactly equivariant) models vs vanilla: below vanilla: none" in text
    assert "Ended exactly equivariant (γ ≈ 0 on every layer): `cr`" in text
    assert "Ended with γ > 0 somewhere" in text and "`recm` (max |γ| 0.800)" in text
    assert "No relaxed run beat vanilla" not in text


def test_reading_says_so_when_no_controller_beats_vanilla():
    lines = compare.reading(_results(_run("vanilla", 100.0), _run("ace-resilient", 110.0, 104.0, GAMMA_KEPT)))
    assert "No relaxed run beat vanilla on test force MAE with this budget." in lines
    assert "Lowest test force MAE: `vanilla` (model), 100.0 meV/Å." in lines


def test_failed_run_is_a_row_of_the_table_and_a_line_of_the_reading():
    results = _results(_run("vanilla", 100.0), _run("cr", None, status="failed", error="exit code 1: equirelax: boom"))
    table = compare.table(results).splitlines()
    assert len(table) == 4
    assert table[3].startswith("| cr | **failed**: exit code 1: equirelax: boom |")
    assert table[3].count("|") == table[0].count("|")  # same number of columns as the header
    assert any("`cr` failed (exit code 1: equirelax: boom)" in line for line in compare.reading(results))


def test_reading_names_the_epoch_and_theta_of_a_cr_model_saved_mid_schedule():
    mid = _run("cr", 121.0, 119.0, {"model.interactions.0.linear": 0.4, "model.products.0.linear": 0.4})
    mid["model_epoch"] = 2  # of 3: the host kept the lowest-validation epoch
    text = "\n".join(compare.reading(_results(_run("vanilla", 120.0), mid)))
    assert "`cr`: the host kept its epoch-2 model (lowest validation loss), at θ = 0.40" in text
    assert "θ = 0 at epoch 3" in text
    assert "epoch-3" not in "\n".join(compare.reading(_results(_run("cr", 121.0, 121.0, GAMMA_ZERO))))
    early = _run("ace", 121.0, 119.0, {"model.interactions.0.linear": -0.11, "model.products.0.linear": 0.05})
    early["model_epoch"] = 1
    text = "\n".join(compare.reading(_results(early)))
    assert "`ace`: the host kept its epoch-1 model (lowest validation loss), at |γ| up to 0.11, before the " \
           "controller closed (γ = 0 at epoch 3)" in text


def test_table_shows_the_symmetry_map_beside_gamma():
    run = _run("recm", 125.0, 108.0, GAMMA_KEPT)
    run["breaking"] = {"model.interactions.0.linear": 0.031, "model.products.0.linear": 0.0}
    header, _, row = compare.table(_results(run)).splitlines()[:3]
    assert "| γ per layer | symmetry breaking per layer |" in header
    assert "| interactions.0.linear: 0.031, products.0.linear: 0.000 |" in row
    assert header.count("|") == row.count("|")


def test_table_drops_the_shared_layer_prefix_and_shows_numbers():
    row = compare.table(_results(_run("recm", 125.0, 108.0, GAMMA_KEPT))).splitlines()[2]
    assert "| 125.0 / 108.0 |" in row and "interactions.0.linear: 0.800, products.0.linear: 0.600" in row
    assert "model.interactions" not in row and "| 2.0e-15 / 2.0e-01 |" in row and "| 3 |" in row


def test_write_report_writes_markdown_json_and_png_plots(tmp_path):
    results = _results(_run("vanilla", 120.0), _run("recm", 125.0, 108.0, GAMMA_KEPT))
    compare.write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| recm | ok | 125.0 / 108.0 |" in report and "## Reading" in report
    assert "![gamma.png](gamma.png)" in report
    assert json.loads((tmp_path / "results.json").read_text())["runs"][1]["gamma"] == GAMMA_KEPT
    for name in ("validation.png", "gamma.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_non_finite_numbers_are_written_as_null(tmp_path):
    run = compare.Run("recm", "recm", tmp_path)
    run.test = {"relaxed": {"force_mae_mev_per_a": math.nan, "equivariance_error": {"forces": math.inf}}}
    record = _json_run(run)
    assert record["test"]["relaxed"] == {"force_mae_mev_per_a": None, "equivariance_error": {"forces": None}}
    json.dumps(record, allow_nan=False)


@pytest.fixture()
def user_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_emt_dataset(tmp_path / "test.xyz", 3, seed=1)
    config = {"name": "mine", "train_file": "train.xyz", "test_file": "test.xyz", "max_num_epochs": 2, "seed": 1}
    (tmp_path / "mace.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "mace.yaml"


@pytest.mark.parametrize("kwargs,message", [
    ({"controllers": ["vanilla", "recmm"]}, "unknown controller 'recmm'"),
    ({"controllers": ["vanilla", "recm", "vanilla"]}, "['vanilla'] listed twice"),
    ({"controllers": []}, "at least one entry"),
    ({"controllers": ["vanilla", "recm"], "controller_options": {"ace": {"dual_lr": 0.1}}},
     "names ['ace'], which are not in --controllers"),
    ({"controller_options": {"vanilla": {"gamma": 1}}}, "vanilla is the host's own training and takes no options"),
    ({"controller_options": {"recm": {"probe_every": 1}}}, "probe_every"),
    ({"controller_options": {"ace": {"dual_lr": -1.0}}, "controllers": ["ace"]}, "dual_lr"),
    ({"test_file": "missing.xyz"}, "no test file at"),
    ({"host_name": "gromacs"}, "unknown host 'gromacs'"),
])
def test_bad_input_stops_compare_before_any_training(user_config, tmp_path, kwargs, message):
    arguments = {"host_name": "mace", "config_path": user_config, "out": tmp_path / "out", **kwargs}
    with pytest.raises(compare.CompareError) as error:
        compare.compare(**arguments)
    assert message in str(error.value)
    assert str(error.value).startswith("equirelax:")
    assert not (tmp_path / "out").exists()


def test_config_without_a_test_set_or_not_a_mapping_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_test.yaml").write_text(yaml.safe_dump({"train_file": "train.xyz"}))
    with pytest.raises(compare.CompareError, match="give the config one \\(test_file\\) or pass --test-file"):
        compare.compare("mace", tmp_path / "no_test.yaml", tmp_path / "out")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(compare.CompareError, match="is not a YAML mapping"):
        compare.compare("mace", tmp_path / "list.yaml", tmp_path / "out")
    with pytest.raises(compare.CompareError, match="no config file at"):
        compare.compare("mace", tmp_path / "absent.yaml", tmp_path / "out")
    (tmp_path / "nequip.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 2}}))
    with pytest.raises(compare.CompareError, match="has no training_module.model"):
        compare.compare("nequip", tmp_path / "nequip.yaml", tmp_path / "out")


def test_relative_paths_are_taken_from_the_working_directory(user_config, tmp_path):
    (tmp_path / "train.xyz").write_text("")
    host = MaceHost(user_config, HostOptions(epochs=5, seed=7, test_file=None, device=None))
    assert host.config["train_file"] == str(tmp_path / "train.xyz")
    assert host.config["max_num_epochs"] == 5 and host.config["seed"] == 7


def test_relative_pretraining_files_are_resolved_and_a_missing_one_stops_compare(user_config, tmp_path):
    (tmp_path / "train.xyz").write_text("")
    (tmp_path / "pt.xyz").write_text("")
    config = yaml.safe_load(user_config.read_text())
    user_config.write_text(yaml.safe_dump({**config, "pt_train_file": "pt.xyz", "foundation_model": "small"}))
    host = MaceHost(user_config, HostOptions())
    assert host.config["pt_train_file"] == str(tmp_path / "pt.xyz")
    host.check_inputs()  # "small" names a foundation model, not a file
    user_config.write_text(yaml.safe_dump({**config, "pt_train_file": "data/pt_missing.xyz"}))
    with pytest.raises(compare.CompareError, match="pt_train_file: no file at .*data/pt_missing.xyz"):
        compare.compare("mace", user_config, tmp_path / "out", ["vanilla", "ace"])
    assert not (tmp_path / "out").exists()


def test_a_missing_nequip_data_file_stops_compare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_emt_dataset(tmp_path / "test.xyz", 3, seed=1)
    config = {"data": {"split_dataset": {"file_path": "train_missing.xyz"}, "test_file_path": "test.xyz"},
              "trainer": {"max_epochs": 1}, "training_module": {"model": {"_target_": "nequip.model.NequIPGNNModel"}}}
    (tmp_path / "nequip.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(compare.CompareError, match="file_path: no file at .*train_missing.xyz"):
        compare.compare("nequip", tmp_path / "nequip.yaml", tmp_path / "out", ["vanilla"])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ several seeds
def _seeded(vanilla, relaxed_eq, relaxed):
    """Per-seed results: vanilla and one ``recm`` run per seed with the given force MAEs."""
    return {seed: _results(_run("vanilla", v), _run("recm", e, r, GAMMA_KEPT))
            for seed, (v, e, r) in enumerate(zip(vanilla, relaxed_eq, relaxed))}


def test_seed_aggregation_and_paired_verdict_are_computed_from_the_per_seed_numbers():
    from statistics import fmean, stdev

    vanilla, exported, relaxed = [100.0, 120.0, 110.0], [104.0, 118.0, 113.0], [90.0, 115.0, 100.0]
    aggregated = compare.aggregate(_seeded(vanilla, exported, relaxed))
    row = aggregated["runs"]["recm"]["relaxed/force_mae_mev_per_a"]
    assert row["mean"] == pytest.approx(fmean(relaxed)) and row["std"] == pytest.approx(stdev(relaxed))
    assert aggregated["runs"]["vanilla"]["equivariant/force_mae_mev_per_a"]["std"] == pytest.approx(stdev(vanilla))
    differences = [r - v for r, v in zip(relaxed, vanilla)]
    verdict = aggregated["verdicts"]["recm/relaxed"]
    assert verdict["lower"] == 3 and verdict["n"] == 3
    assert verdict["mean_difference"] == pytest.approx(fmean(differences))
    assert verdict["std_difference"] == pytest.approx(stdev(differences))
    assert verdict["relative"] == pytest.approx(fmean(d / v for d, v in zip(differences, vanilla)))
    assert aggregated["verdicts"]["recm/equivariant"]["lower"] == 1  # 118 < 120 only

    lines = compare.seeds_reading(aggregated)
    assert any(line.startswith("`recm` (relaxed model): below vanilla on every one of 3 seeds") for line in lines)
    assert any(line.startswith("`recm` (equivariant model): lower than vanilla on 1 of 3 seeds") and
               "no consistent difference, within the spread" in line for line in lines)
    table = compare.seeds_table(aggregated)
    assert f"| recm | {fmean(exported):.1f} ± {stdev(exported):.1f} | {fmean(relaxed):.1f} ± {stdev(relaxed):.1f} |" \
        in table
    assert "relaxed: lower on 3 of 3" in table


def test_relaxed_runs_are_paired_per_seed_with_the_host_baseline_too():
    lora, relaxed = [110.0, 100.0, 105.0], [90.0, 104.0, 95.0]
    per_seed = {seed: {**_results(_run("vanilla", 120.0), _run("lora", l), _run("recm", 125.0, r, GAMMA_KEPT)),
                       "baselines": {"lora": "MACE's own LoRA"}}
                for seed, (l, r) in enumerate(zip(lora, relaxed))}
    aggregated = compare.aggregate(per_seed)
    assert set(aggregated["baseline_verdicts"]) == {"lora"}
    against = aggregated["baseline_verdicts"]["lora"]
    assert "lora/equivariant" not in against and "vanilla/equivariant" not in against
    assert against["recm/relaxed"]["lower"] == 2 and against["recm/relaxed"]["mean_difference"] == pytest.approx(
        sum(r - l for r, l in zip(relaxed, lora)) / 3)
    assert against["recm/equivariant"]["lower"] == 0
    assert aggregated["verdicts"]["lora/equivariant"]["lower"] == 3  # the baseline itself, against vanilla
    lines = compare.seeds_reading(aggregated)
    assert any(line.startswith("`recm` (relaxed model): lower than lora on 2 of 3 seeds") for line in lines)
    assert any(line.startswith("`recm` (equivariant model): above lora on every one of 3 seeds") for line in lines)


def test_two_seeds_are_too_few_for_a_claim_and_failed_seeds_are_named():
    per_seed = _seeded([100.0, 100.0], [90.0, 90.0], [80.0, 80.0])
    per_seed[1]["runs"][1] = _run("recm", 0.0, status="failed", error="exit code 1")
    aggregated = compare.aggregate(per_seed)
    assert aggregated["runs"]["recm"]["failed_seeds"] == [1]
    assert aggregated["verdicts"]["recm/relaxed"]["n"] == 1
    assert all("too few seeds to claim a difference" in line for line in compare.seeds_reading(aggregated))
    assert "| 1 |" in compare.seeds_table(aggregated)


def test_reading_puts_a_host_baseline_beside_vanilla_and_the_relaxed_runs():
    lora = _run("lora", 110.0)
    lora["relaxed_run"], lora["controller"] = False, None
    results = _results(_run("vanilla", 120.0), lora, _run("recm", 125.0, 104.5, GAMMA_KEPT),
                       _run("ace", 121.0, 115.5, GAMMA_KEPT))
    results["baselines"] = {"lora": "the host's LoRA fine-tuning"}
    text = "\n".join(compare.reading(results))
    assert "Baseline `lora` (the host's LoRA fine-tuning): test force MAE 110.0 meV/Å (-8.3% vs vanilla)." in text
    assert "Relaxed models vs `lora`: below: `recm` (-5.0%); not below: `ace` (+5.0%)." in text
    assert "| lora | ok |" in compare.table(results)
