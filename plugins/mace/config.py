"""equirelax's settings of a MACE run, taken out of MACE's arguments: ``relax`` (YAML section or ``--relax``),
checked the way every host checks them (``equirelax.core.settings``), and ``field_input``."""

from __future__ import annotations

import json
import tempfile

RELAX_KEYS = ("controller", "targets", "branch", "rank", "init", "init_std", "group", "export", "options",
              "on_nonfinite")
EXPORT_MODES = ("merge", "drop", "none")
FIELD_KEY = "external_field"  # MACE's name for a structure's field (PolarMACE, MACECalculator's info_keys)


class RelaxConfigError(ValueError):
    pass


def validate_relax_config(section) -> dict:
    """The ``relax`` section checked (``equirelax.core.settings``, as for every host) and completed with defaults."""
    from ...core.settings import validate_relax_settings

    return validate_relax_settings(section, keys=RELAX_KEYS)


def field_input_key(value) -> str | None:
    """The extxyz info key of the field for a ``field_input`` setting (``true`` or ``{key: NAME}``); None: off."""
    if value is None or value is False:
        return None
    if value is True:
        return FIELD_KEY
    if isinstance(value, dict) and set(value) <= {"key"} and isinstance(value.get("key", FIELD_KEY), str):
        return value.get("key", FIELD_KEY)
    raise RelaxConfigError(f"equirelax: field_input must be true or {{key: <extxyz info key of the field>}}, "
                           f"not {value!r}")


def split_relax_config(argv: list[str]):
    """Take the relax settings out of the MACE arguments.

    Returns ``(relax_config or None, argv for MACE, temporary config file or None)``; the caller
    removes the temporary file (the YAML without its ``relax`` section) once MACE has read it.
    """
    relax, _, argv, stripped_path = split_equirelax_config(argv)
    return relax, argv, stripped_path


def split_equirelax_config(argv: list[str]):
    """Take equirelax's settings out of the MACE arguments: ``relax`` (YAML section or ``--relax``) and
    ``field_input`` (YAML key or a bare ``--field_input``).

    Returns ``(relax_config or None, field key or None, argv for MACE, temporary config file or None)``; the
    caller removes the temporary file (the YAML without equirelax's keys) once MACE has read it.
    """
    import yaml

    argv = list(argv)
    section = None
    given = False  # a relax section present, even an empty one (``relax:`` with every key commented out)
    field_input = None
    if "--field_input" in argv:
        argv.remove("--field_input")
        field_input = True
    stripped_path = config_index = None
    for i, arg in enumerate(argv):
        if arg.startswith("--relax="):
            section, given = json.loads(arg.split("=", 1)[1]), True
            del argv[i]
            break
        if arg == "--relax":
            section, given = json.loads(argv[i + 1]), True
            del argv[i : i + 2]
            break
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            with open(path, encoding="utf-8") as handle:
                content = yaml.safe_load(handle) or {}
            removed = {"relax", "field_input"} & set(content)
            if "relax" in content:
                if given:
                    raise RelaxConfigError("equirelax: relax settings given both in --relax and in the YAML config")
                section, given = content.pop("relax"), True
            if "field_input" in content:
                field_input = content.pop("field_input") if field_input is None else field_input
            config_index = i if removed else None
            break
    field_key = field_input_key(field_input)
    config = validate_relax_config(section) if given else None
    if config is not None:
        config["all_defaults"] = not section  # said at start-up: an empty section relaxes with every default
    if config_index is not None:  # written only once the settings are valid: a refused config leaves no file
        stripped = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix="mace-config-")
        yaml.safe_dump(content, stripped)
        stripped.close()
        stripped_path = stripped.name
        arg = argv[config_index]
        if "=" in arg:
            argv[config_index] = f"--config={stripped.name}"
        else:
            argv[config_index + 1] = stripped.name
    return config, field_key, argv, stripped_path
