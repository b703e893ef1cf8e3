"""The relax settings a user writes in a host's config (MACE's ``relax:`` section, NequIP's ``RelaxedModel``),
checked the same way for every host, before the host starts, with the same messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .branches import BRANCHES
from .controllers import get_controller
from .irreps import GROUPS

EXPORT_MODES = ("merge", "drop", "none")
INIT_MODES = ("zero", "random")
NONFINITE_POLICIES = ("warn", "raise")
DEFAULTS = {"controller": "ace", "branch": "lowrank", "init": "zero", "export": "merge", "options": {}}
KEYS = ("controller", "targets", "branch", "rank", "init", "init_std", "group", "on_nonfinite", "options", "export",
        "seed")


class RelaxSettingsError(ValueError):
    pass


def _fail(message: str):
    raise RelaxSettingsError(f"equirelax: {message}")


def _choice(settings: dict, key: str, choices) -> None:
    if key in settings and settings[key] not in choices:
        _fail(f"relax.{key} must be one of {list(choices)}, got {settings[key]!r}")


def validate_relax_settings(section, *, keys=KEYS, cr_epochs_later: bool = True) -> dict:
    """``section`` checked and completed with the defaults; raises ``RelaxSettingsError`` naming the problem.

    ``keys``: the keys this host accepts. ``cr_epochs_later``: CR's ``epochs`` comes from the host's own
    epoch count once training starts, so it may be missing here.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        _fail(f"the relax settings must be a mapping of keys {sorted(keys)}, got {section!r}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        _fail(f"unknown key(s) {unknown} in the relax settings; allowed: {sorted(keys)}")
    settings = {**{k: v for k, v in DEFAULTS.items() if k in keys}, **section}
    if not isinstance(settings.get("options", {}), Mapping):
        _fail(f"relax.options must be a mapping of controller options, got {settings['options']!r}")
    settings["options"] = dict(settings.get("options", {}))
    if not isinstance(settings["controller"], str):
        _fail(f"relax.controller must be a controller name, got {settings['controller']!r}")
    _choice(settings, "branch", sorted(BRANCHES))
    _choice(settings, "init", INIT_MODES)
    _choice(settings, "export", EXPORT_MODES)
    _choice(settings, "group", GROUPS)
    _choice(settings, "on_nonfinite", NONFINITE_POLICIES)
    rank = settings.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        _fail(f"relax.rank must be a positive integer, got {rank!r}")
    targets = settings.get("targets")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets)):
        _fail(f"relax.targets must be a name pattern or a list of them, got {targets!r}")
    if targets is not None and not isinstance(targets, str):
        settings["targets"] = list(targets)
    options = dict(settings["options"])
    if cr_epochs_later and settings["controller"] == "cr" and "epochs" not in options:
        options["epochs"] = 1  # the host sets it from its own epoch count
    try:
        get_controller(settings["controller"], **options)
    except (TypeError, ValueError) as error:
        message = str(error)
        _fail(message[len("equirelax: "):] if message.startswith("equirelax: ") else
              f"controller {settings['controller']!r}: {message}")
    return settings
