"""MACE given the external field as an equivariant input (the field-input baseline; MACE environment only)."""

import copy
import io
import os

import pytest
import torch

pytest.importorskip("mace")

from equirelax.adapters.mace import mace_equivariance_error  # noqa: E402
from equirelax.adapters.mace import add_field_input, has_field_input  # noqa: E402
from equirelax.plugins.mace.config import split_equirelax_config  # noqa: E402

from .test_mace_adapter import batch_of, predict, tiny_mace  # noqa: E402

FIELD = [0.0, 0.0, 0.3]


def _trained_field_model():
    model, table = tiny_mace()
    add_field_input(model)
    with torch.no_grad():
        model.products[0].field_weight.normal_(generator=torch.Generator().manual_seed(0))
    return model, table


def test_field_input_starts_from_the_models_predictions():
    model, table = tiny_mace()
    batch = batch_of(table, field=FIELD)
    predict(model, batch)
    energy, forces = predict(model, batch)
    add_field_input(model)
    assert has_field_input(model)
    field_energy, field_forces = predict(model, batch)
    assert torch.equal(field_energy, energy) and torch.equal(field_forces, forces)


def test_field_input_depends_on_the_field_and_is_equivariant_when_it_rotates_with_the_structure():
    model, table = _trained_field_model()
    batch = batch_of(table, field=FIELD)
    energy, forces = predict(model, batch)
    flipped = {**batch, "external_field": -batch["external_field"]}
    flipped_energy, flipped_forces = predict(model, flipped)
    assert (flipped_energy - energy).abs().max() > 1e-4 and (flipped_forces - forces).abs().max() > 1e-4
    error = mace_equivariance_error(model, batch, n_rotations=3, generator=torch.Generator().manual_seed(1))
    assert error["energy"]["max"] < 1e-10 and error["forces"]["max"] < 1e-10  # field rotated with the structure
    rotated = copy.copy(batch)
    R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=batch["positions"].dtype)
    rotated["positions"] = batch["positions"] @ R.T  # about z: F along z is unchanged, so this is a symmetry
    assert torch.allclose(predict(model, rotated)[0], energy, atol=1e-10)
    R_x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=batch["positions"].dtype)
    rotated["positions"] = batch["positions"] @ R_x.T  # about x: it moves the structure relative to F
    assert not torch.allclose(predict(model, rotated)[0], energy, atol=1e-6)


def test_field_input_model_saves_and_loads_with_its_weights():
    model, table = _trained_field_model()
    batch = batch_of(table, field=FIELD)
    energy, _ = predict(model, batch)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.joint_embedding.node_field is None  # no batch's field is saved with the model
    assert torch.equal(loaded.products[0].field_weight, model.products[0].field_weight)
    assert torch.equal(predict(loaded, batch)[0], energy)


def test_mace_calculator_gives_the_field_input_model_the_atoms_field(tmp_path):
    from mace.calculators import MACECalculator

    from equirelax.datasets.emt import emt_configurations

    model, table = _trained_field_model()
    torch.save(model, tmp_path / "field.model")
    atoms = emt_configurations(1, seed=0, field=FIELD)[0]
    expected, _ = predict(model, batch_of(table, n=1, field=FIELD))
    calculator = MACECalculator(model_paths=str(tmp_path / "field.model"), device="cpu", default_dtype="float64")
    atoms.calc = calculator
    assert atoms.get_potential_energy() == pytest.approx(float(expected[0]), abs=1e-8)
    atoms.info["external_field"] = -atoms.info["external_field"]
    calculator.reset()
    assert abs(atoms.get_potential_energy() - float(expected[0])) > 1e-4  # the field it read, not a stored one


def test_field_input_needs_vector_channels():
    from e3nn import o3

    model, _ = tiny_mace()
    model.products[0].linear.irreps_out = o3.Irreps("8x0e")
    with pytest.raises(ValueError, match="no 1o channel"):
        add_field_input(model)


@pytest.mark.parametrize("value, key", [(True, "external_field"), ({"key": "E_field"}, "E_field"), (False, None)])
def test_field_input_setting_is_taken_out_of_macess_config(tmp_path, value, key):
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "field_input": value}))
    relax, field_key, argv, stripped = split_equirelax_config(["--config", str(tmp_path / "config.yaml")])
    assert relax is None and field_key == key
    assert yaml.safe_load(open(argv[1])) == {"name": "x"}
    os.unlink(stripped)


def test_a_bad_field_input_setting_names_the_forms_it_takes(tmp_path):
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"field_input": "yes please"}))
    with pytest.raises(ValueError, match=r"field_input must be true or \{key:"):
        split_equirelax_config(["--config", str(tmp_path / "config.yaml")])


def test_field_input_on_data_without_a_field_stops_naming_the_key(tmp_path):
    from types import SimpleNamespace

    from equirelax.datasets.emt import write_emt_dataset
    from equirelax.plugins.mace.field import field_input_setup

    write_emt_dataset(tmp_path / "symmetric.xyz", 2, seed=0)
    args = SimpleNamespace(train_file=str(tmp_path / "symmetric.xyz"))
    with pytest.raises(SystemExit, match="its extxyz info 'external_field'.*symmetric.xyz has none"):
        with field_input_setup(args, "external_field"):
            pass


def test_maces_config_extraction_reads_a_field_input_model():
    from mace.tools.scripts_utils import extract_config_mace_model

    model, _ = _trained_field_model()
    plain, _ = tiny_mace()
    config, expected = extract_config_mace_model(model), extract_config_mace_model(plain)
    assert set(config) == set(expected)
    for key in ("correlation", "hidden_irreps", "num_interactions", "max_ell", "r_max"):
        assert config[key] == expected[key], key


def test_field_input_is_added_once():
    model, _ = _trained_field_model()
    weights = model.products[0].field_weight
    assert add_field_input(model).products[0].field_weight is weights
