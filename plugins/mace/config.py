"""The ``relax`` settings of a MACE run: taken out of MACE's arguments (YAML ``relax:`` section or ``--relax``)
and checked the way every host checks them (``equirelax.core.settings``)."""

from __future__ import annotations

import json
import tempfile

RELAX_KEYS = ("controller", "targets", "branch", "rank", "init", "init_std", "group", "export", "options",
              "on_nonfinite")
EXPORT_MODES = ("merge", "drop", "none")


class RelaxConfigError(ValueError):
    pass


def validate_relax_config(section) -> dict:
    """The ``relax`` section checked (``equirelax.core.settings``, as for every host) and completed with defaults."""
    from ...core.settings import validate_relax_settings

    return validate_relax_settings(section, keys=RELAX_KEYS)


def split_relax_config(argv: list[str]):
    """Take the relax settings out of the MACE arguments.

    Returns ``(relax_config or None, argv for MACE, temporary config file or None)``; the caller
    removes the temporary file (the YAML without its ``relax`` section) once MACE has run.
    """
    import yaml

    argv = list(argv)
    section = None
    given = False  # a relax section present, even an empty one (``relax:`` with every key commented out)
    stripped_path = None
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
            if "relax" in content:
                if given:
                    raise RelaxConfigError("equirelax: relax settings given both in --relax and in the YAML config")
                section, given = content.pop("relax"), True
                stripped = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix="mace-config-")
                yaml.safe_dump(content, stripped)
                stripped.close()
                stripped_path = stripped.name
                if "=" in arg:
                    argv[i] = f"--config={stripped.name}"
                else:
                    argv[i + 1] = stripped.name
            break
    if not given:
        return None, argv, stripped_path
    config = validate_relax_config(section)
    config["all_defaults"] = not section  # said at start-up: an empty section relaxes with every default
    return config, argv, stripped_path
