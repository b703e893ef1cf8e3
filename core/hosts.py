"""The interface between a host plugin and the host-agnostic tools (``equirelax compare``, ``pretrain``, ``export``).

A host plugin subclasses ``Host`` and registers it under the entry-point group
``equirelax.hosts`` (``mace = "equirelax.plugins.mace.host:MaceHost"``) or, in
one process, with ``register_host``. The tools then reach the host only through
these methods; they keep no host names.

compare, for each run: ``check`` (before any training), ``command`` (the host's
own training, run in ``run.directory``), then ``curves``, ``models`` and
``predict`` on the test set. ``run`` carries ``name``, ``controller`` (None for
vanilla), ``relaxed``, ``directory``, ``options`` (the controller's), and
``model_epoch``, which ``models`` sets.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "equirelax.hosts"
EQUIVARIANCE_CONFIGURATIONS = 8  # test configurations rotated for the equivariance error
EVALUATION_BATCH = 16


class HostConfigError(ValueError):
    """A host config that no run could train with: raised before any training starts."""


@dataclass
class HostOptions:
    """What the user overrides for every run of a comparison."""

    epochs: int | None = None
    seed: int | None = None
    test_file: str | None = None
    device: str | None = None


class Host:
    """One host trainer, as the tools see it. Subclasses set the attributes and implement the methods."""

    name = "host"
    package: str | None = None  # the module the host's training needs importable (None: nothing beyond equirelax)
    extra: str | None = None  # ``pip install 'equirelax[<extra>]'`` installs it
    config_help = "a host config file"
    test_file_key = "test_file"  # where the host's config names its test set, for messages
    saved_model = "lowest validation loss"  # which model of a run the host keeps, for the report
    can_export = False
    # rows compare can run besides vanilla and the controllers: the host's own alternatives to relaxation
    # (``{name: what it is}``); ``command`` sees the name as ``run.name`` with ``run.controller`` None
    baselines: dict = {}
    # what ``equirelax pretrain`` generates and trains unless told: configurations and epochs
    pretrain_defaults = {"n": 80, "epochs": 40}

    # set by __init__ from the user's config and the options
    config: dict
    test_file: str | None = None
    energy_key = "energy"
    forces_key = "forces"
    epochs: int | None = None
    device = "cpu"

    def __init__(self, config_path: Path, options: HostOptions):
        raise NotImplementedError

    @property
    def seed(self):
        return self.config.get("seed")

    def check(self, controller: str, options: dict) -> None:
        """Raise (ValueError/TypeError/KeyError) when ``controller`` with ``options`` cannot run."""
        raise NotImplementedError

    def check_inputs(self) -> None:
        """Raise ``HostConfigError`` for a problem every run would hit (a data file that is not there)."""

    relax_settings: dict = {}

    def relax_section(self, controller: str, options: dict) -> dict:
        """The run's relax settings: the config's own, with this controller and its options on top."""
        return {**self.relax_settings, "controller": controller,
                "options": {**self.relax_settings.get("options", {}), **options}}

    def own_test_set(self) -> str | None:
        """When the config defines its test set other than as a file (a split of the data, a dataset class): a
        description of it for the report; None otherwise. Consulted only when no test file is given."""
        return None

    def own_test_frames(self) -> list:
        """That test set as ASE ``Atoms`` with reference energy and forces (in ``info``/``arrays`` or a calculator)."""
        raise NotImplementedError

    def command(self, run) -> list[str]:
        """Write the run's config into ``run.directory``; return the command line of its training."""
        raise NotImplementedError

    def curves(self, run) -> dict:
        """``{"epoch": [...], "val_force_mae": [...] (meV/Å), "gamma": {layer: [[epoch, γ]]}, "breaking": {...}}``"""
        raise NotImplementedError

    def models(self, run) -> tuple:
        """``(equivariant, relaxed or None)``: the saved model(s), the relaxed run's exported one first.
        Sets ``run.model_epoch``."""
        raise NotImplementedError

    def predict(self, model, frames) -> tuple:
        """``(energies, forces per configuration, {"energy": err, "forces": err})`` for ASE ``frames``; the
        errors are the largest relative change under random O(3) rotations."""
        raise NotImplementedError

    @classmethod
    def pretrain(cls, out: Path, train_file: Path, epochs: int, seed: int, test_file: Path | None = None) -> Path:
        """Train a small plain model on ``train_file`` with the host's own training (which also reports its errors
        on ``test_file``); return where it is saved. ``pretrain_defaults`` sizes what ``equirelax pretrain`` runs."""
        raise NotImplementedError(f"equirelax: pretrain has no {cls.name} support")

    @classmethod
    def export(cls, checkpoint: Path, out: Path, mode: str) -> str:
        """Write a plain host model from a relaxed checkpoint; return a line saying what to do with it."""
        raise NotImplementedError(f"equirelax: export has no {cls.name} support")

    @classmethod
    def deploy(cls, checkpoint: Path, out: Path | None) -> str:
        """Write the relaxed model of ``checkpoint`` (γ and branches kept, frozen) in the form the host deploys
        (compiled or packaged: it runs without equirelax); return a line saying what was written and how to run it."""
        raise NotImplementedError(f"equirelax: deploy has no {cls.name} support")


_registered: dict = {}


def register_host(name: str, host: type) -> None:
    """Make ``host`` available under ``name`` in this process (entry points do it for installed plugins)."""
    if not (isinstance(host, type) and issubclass(host, Host)):
        raise TypeError(f"equirelax: a host must be a subclass of equirelax.core.hosts.Host, got {host!r}")
    _registered[name] = host


def available_hosts() -> dict:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update(_registered)
    return found


def get_host(name: str) -> type:
    found = available_hosts()
    if name not in found:
        raise HostConfigError(f"equirelax: unknown host {name!r}; choose one of {sorted(found)} (host plugins "
                              f"register under the entry-point group {ENTRY_POINT_GROUP!r})")
    host = found[name]
    return host if isinstance(host, type) else host.load()


# ------------------------------------------------------------- helpers for host plugins
def load_yaml_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise HostConfigError(f"equirelax: no config file at {path}")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise HostConfigError(f"equirelax: {path} is not a YAML mapping of config keys")
    return content


def absolute_if_file(value, base: Path):
    """``value`` made absolute against ``base`` when it names a file there (config paths, taken from the cwd)."""
    if isinstance(value, str) and value and "${" not in value and not os.path.isabs(value):
        candidate = base / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def pop_relax_section(config: dict, config_path) -> dict:
    """The config's own relax settings (taken out: compare sets them per run); ``{}`` when it has none."""
    section = config.pop("relax", None) or {}
    if not isinstance(section, dict):
        raise HostConfigError(f"equirelax: the 'relax' section of {config_path} must be a mapping")
    return section


def looks_like_file(value) -> bool:
    """A config value meant as a file path (not a keyword such as ``average`` or ``mp``, not an interpolation)."""
    return (isinstance(value, str) and bool(value) and "${" not in value and not any(c in value for c in "*?[")
            and ("/" in value or os.sep in value or Path(value).suffix != ""))


def missing_file(key: str, value) -> HostConfigError:
    where = Path(value) if os.path.isabs(value) else Path.cwd() / value
    return HostConfigError(f"equirelax: {key}: no file at {where} (relative paths in the config are taken from the "
                           "directory compare runs in)")


def layer_curves(curves: dict, row: dict, epoch: int) -> None:
    """γ and symmetry breaking per layer from one logged row (``equirelax/gamma/<layer>``, ``equirelax/breaking/…``)."""
    for key, value in row.items():
        for quantity in ("gamma", "breaking"):
            prefix = f"equirelax/{quantity}/"
            if key.startswith(prefix) and value not in (None, ""):
                curves[quantity].setdefault(key[len(prefix):], []).append([epoch, float(value)])


def empty_curves() -> dict:
    return {"epoch": [], "val_force_mae": [], "gamma": {}, "breaking": {}}


class EpochTimer:
    """Training seconds of each epoch, written to ``path`` (``epochs.json``, which compare reads) after each."""

    def __init__(self, path: str):
        self.path = path
        self.seconds: list[float] = []
        self.best_checkpoint = None
        self._start = None

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None
            self.write()

    def write(self):
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump({"epoch_seconds": self.seconds, "best_checkpoint": self.best_checkpoint}, handle)


def write_resources(run_dir: str) -> None:
    """Peak memory of this training process, as ``resources.json`` in ``run_dir`` (compare reads it)."""
    import torch

    record = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "peak_gpu_mb": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(os.path.join(run_dir, "resources.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
