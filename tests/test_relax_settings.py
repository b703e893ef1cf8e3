"""One check of the relax settings for every host (MACE's ``relax:`` section, NequIP's ``RelaxedModel``), with the
same messages, before the host starts; an empty MACE ``relax:`` section says what it does."""

import os

import pytest
import yaml

from equirelax.core.settings import RelaxSettingsError, validate_relax_settings
from equirelax.plugins.mace.config import RELAX_KEYS as MACE_KEYS
from equirelax.plugins.mace.config import split_relax_config, validate_relax_config
from equirelax.plugins.nequip.config import RELAX_KEYS as NEQUIP_KEYS

BAD = [
    ({"options": [1, 2]}, "relax.options must be a mapping of controller options, got [1, 2]"),
    ({"controller": "acme"}, "unknown controller 'acme'"),
    ({"branch": "dense"}, "relax.branch must be one of ['linear', 'lowrank', 'mlp'], got 'dense'"),
    ({"init": "ones"}, "relax.init must be one of ['zero', 'random'], got 'ones'"),
    ({"rank": 0}, "relax.rank must be a positive integer, got 0"),
    ({"targets": 3}, "relax.targets must be a name pattern or a list of them, got 3"),
    ({"group": "SE3"}, "relax.group must be one of ['O3', 'SO3'], got 'SE3'"),
    ({"controller": "recm", "options": {"probe_every": 1}}, "probe_every"),
    ({"colour": "blue"}, "unknown key(s) ['colour']"),
]


@pytest.mark.parametrize("section,message", BAD)
def test_bad_settings_name_the_problem(section, message):
    with pytest.raises(RelaxSettingsError) as error:
        validate_relax_settings(section)
    assert message in str(error.value) and str(error.value).startswith("equirelax: ")


@pytest.mark.parametrize("section,message", BAD)
def test_mace_and_nequip_refuse_with_the_same_message(section, message):
    with pytest.raises(RelaxSettingsError) as mace_error:
        validate_relax_config(section)
    assert message in str(mace_error.value)
    pytest.importorskip("lightning")
    from equirelax.plugins.nequip import RelaxedModel

    if "colour" in section:  # RelaxedModel hands unknown keywords to the inner model, as NequIP's builders do
        return
    settings = {**section}
    options = settings.pop("options", None)
    with pytest.raises(RelaxSettingsError) as nequip_error:
        RelaxedModel({"_target_": "never.built"}, options=options, **settings)
    assert str(nequip_error.value) == str(mace_error.value)


def test_defaults_and_what_each_host_accepts():
    settings = validate_relax_settings(None)
    assert settings == {"controller": "ace", "branch": "lowrank", "init": "zero", "export": "merge", "options": {}}
    assert validate_relax_settings({"targets": ("a", "b"), "controller": "cr"})["targets"] == ["a", "b"]
    assert "export" not in validate_relax_settings({}, keys=NEQUIP_KEYS)
    with pytest.raises(RelaxSettingsError, match=r"unknown key\(s\) \['seed'\]"):
        validate_relax_settings({"seed": 1}, keys=MACE_KEYS)


@pytest.mark.parametrize("section_text", ["relax:\n", "relax:\n  # controller: recm\n", "relax: {}\n"])
def test_an_empty_mace_relax_section_relaxes_with_every_default(tmp_path, section_text):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "max_num_epochs": 2}) + section_text)
    config, argv, stripped = split_relax_config(["--config", str(tmp_path / "config.yaml")])
    assert config is not None and config["all_defaults"] and config["controller"] == "ace"
    assert "relax" not in yaml.safe_load(open(stripped).read())
    os.unlink(stripped)
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"name": "x"}))
    assert split_relax_config(["--config", str(tmp_path / "plain.yaml")])[0] is None


@pytest.mark.parametrize("section", [{"controller": "acme"}, {"controller": "ace", "colour": "blue"}])
def test_a_refused_mace_config_leaves_no_temporary_file(tmp_path, monkeypatch, section):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "relax": section, "field_input": True}))
    with pytest.raises(ValueError):
        split_relax_config(["--config", str(tmp_path / "config.yaml")])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "field_input": "yes please"}))
    with pytest.raises(ValueError, match="field_input"):
        split_relax_config(["--config", str(tmp_path / "config.yaml")])
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("form", ["--config=PATH", "--config PATH"])
def test_the_mace_config_path_is_replaced_in_either_form(tmp_path, form):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"name": "x", "relax": {"controller": "recm"}}))
    path = str(tmp_path / "config.yaml")
    argv = ["--seed", "1", *form.replace("PATH", path).split(" "), "--device", "cpu"]
    config, mace_argv, stripped = split_relax_config(argv)
    assert config["controller"] == "recm" and stripped != path
    expected = [f"--config={stripped}"] if "=" in form else ["--config", stripped]
    assert mace_argv == ["--seed", "1", *expected, "--device", "cpu"]
    assert yaml.safe_load(open(stripped).read()) == {"name": "x"}
    os.unlink(stripped)
