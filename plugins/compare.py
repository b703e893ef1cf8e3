"""``equirelax compare``: vanilla vs relaxed host training on the same data, seed and budget, one report.

    equirelax compare --host mace --config my_mace.yaml --out compare-output
    equirelax compare --host nequip --config my_nequip.yaml --controllers vanilla recm ace-resilient

For every entry of ``--controllers`` (default: vanilla cr ace ace-resilient
recm) the host's own training runs on the user's config, unchanged except for
the relaxation: ``vanilla`` is the config as it is (a ``relax:`` section or
``RelaxedModel`` in it is removed), every other entry adds the relaxation with
that controller (the config's own relax settings, e.g. branch or targets, are
kept). Each run lives in ``OUT/runs/<name>/`` with the host's usual outputs and
``output.log``. Then every resulting model is evaluated the same way on the
test set (the config's ``test_file`` / ``data.test_file_path`` or
``--test-file``): energy and force MAE/RMSE of the equivariant model (vanilla,
or the relaxed run's exported model, branches merged) and of the relaxed model,
their equivariance error under random O(3) rotations, the final γ per layer,
training time per epoch and peak memory. Written to ``OUT``:

    report.md       table and a short reading of the result
    results.json    every number of the table, plus the per-epoch curves
    validation.png  validation force MAE per epoch, every run
    gamma.png       γ and the symmetry breaking per layer over training, every relaxed run

A run that fails is reported in the table with its error; the others go on. The
exit status is 1 when a run failed, 0 otherwise. Relative paths in the config
are taken from the directory ``compare`` is run in.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .nequip_config import CALLBACK_TARGET, RELAXED_MODEL_TARGET

DEFAULT_CONTROLLERS = ("vanilla", "cr", "ace", "ace-resilient", "recm")

EQUIVARIANCE_CONFIGURATIONS = 8
EVALUATION_BATCH = 16


class CompareError(ValueError):
    pass


@dataclass
class Run:
    name: str
    controller: str | None  # None: vanilla host training
    directory: Path
    status: str = "pending"
    error: str | None = None
    wall_seconds: float | None = None
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    peak_gpu_memory_mb: float | None = None
    gamma: dict = field(default_factory=dict)
    breaking: dict = field(default_factory=dict)  # the symmetry map on the test set: ‖γ·P⊥f_neq‖ / ‖f_eq‖ per layer
    model_epoch: int | None = None  # epochs trained by the evaluated (host's saved) model
    test: dict = field(default_factory=dict)  # {"equivariant": metrics, "relaxed": metrics}
    curves: dict = field(default_factory=dict)

    @property
    def relaxed(self) -> bool:
        return self.controller is not None


# ------------------------------------------------------------------- config helpers
def _absolute_if_file(value, base: Path):
    if isinstance(value, str) and value and "${" not in value and not os.path.isabs(value):
        candidate = base / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _resolve_nested_paths(node, base: Path):
    """Relative file paths in a NequIP config (keys ending in ``_path``) made absolute."""
    if isinstance(node, dict):
        return {k: (_absolute_if_file(v, base) if isinstance(k, str) and k.endswith("_path") and isinstance(v, str)
                    else _resolve_nested_paths(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_nested_paths(v, base) for v in node]
    return node


def _load_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise CompareError(f"equirelax: no config file at {path}")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise CompareError(f"equirelax: {path} is not a YAML mapping of config keys")
    return content


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_reference(frames, energy_key: str, forces_key: str):
    import numpy as np

    energies, forces = [], []
    for i, atoms in enumerate(frames):
        if energy_key in atoms.info:
            energies.append(float(atoms.info[energy_key]))
        elif atoms.calc is not None:
            energies.append(float(atoms.get_potential_energy()))
        else:
            raise CompareError(f"equirelax: test configuration {i} has no energy under {energy_key!r}")
        if forces_key in atoms.arrays:
            forces.append(np.asarray(atoms.arrays[forces_key], dtype=float))
        elif atoms.calc is not None:
            forces.append(np.asarray(atoms.get_forces(), dtype=float))
        else:
            raise CompareError(f"equirelax: test configuration {i} has no forces under {forces_key!r}")
    return energies, forces


def _layer_curves(curves: dict, row: dict, epoch: int) -> None:
    """γ and symmetry breaking per layer from one logged row (``equirelax/gamma/<layer>``, ``equirelax/breaking/…``)."""
    for key, value in row.items():
        for quantity in ("gamma", "breaking"):
            prefix = f"equirelax/{quantity}/"
            if key.startswith(prefix) and value not in (None, ""):
                curves[quantity].setdefault(key[len(prefix):], []).append([epoch, float(value)])


def _relaxed_levels(model) -> dict:
    from ..core.layer import RelaxedLayer

    return {name: float(m.gamma.detach()) for name, m in model.named_modules() if isinstance(m, RelaxedLayer)}


# -------------------------------------------------------------------------- hosts
class MaceHost:
    name = "mace"
    PATH_KEYS = ("train_file", "valid_file", "test_file", "test_dir", "foundation_model", "statistics_file", "E0s")
    # outputs stay in the run's own directory; a fresh run never resumes an earlier one
    DROPPED_KEYS = ("work_dir", "model_dir", "log_dir", "checkpoints_dir", "results_dir", "restart_latest")

    def __init__(self, config_path: Path, options):
        config = _load_yaml(config_path)
        base = Path.cwd()
        for key in self.PATH_KEYS:
            if key in config:
                config[key] = _absolute_if_file(config[key], base)
        for key in self.DROPPED_KEYS:
            config.pop(key, None)
        self.relax_settings = config.pop("relax", None) or {}
        if not isinstance(self.relax_settings, dict):
            raise CompareError(f"equirelax: the 'relax' section of {config_path} must be a mapping")
        if options.epochs is not None:
            config["max_num_epochs"] = options.epochs
        if options.seed is not None:
            config["seed"] = options.seed
        self.config = config
        self.test_file = options.test_file or config.get("test_file")
        self.energy_key = config.get("energy_key", "REF_energy")
        self.forces_key = config.get("forces_key", "REF_forces")
        self.epochs = config.get("max_num_epochs")
        self.device = options.device or ("cuda" if str(config.get("device", "cpu")).startswith("cuda") else "cpu")

    def relax_section(self, controller: str, options: dict) -> dict:
        return {**self.relax_settings, "controller": controller,
                "options": {**self.relax_settings.get("options", {}), **options}}

    def check(self, controller: str, options: dict) -> None:
        from .mace import validate_relax_config

        validate_relax_config(self.relax_section(controller, options))

    def command(self, run: Run, options: dict) -> list[str]:
        import yaml

        config = copy.deepcopy(self.config)
        config["name"] = run.name
        if run.relaxed:
            config["relax"] = self.relax_section(run.controller, options)
        (run.directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return [sys.executable, "-m", "equirelax.plugins.compare_child", "mace", str(run.directory),
                "--config", "config.yaml"]

    def curves(self, run: Run) -> dict:
        files = sorted((run.directory / "results").glob("*_train.txt"))
        curves = {"epoch": [], "val_force_mae": [], "gamma": {}, "breaking": {}}
        if not files:
            return curves
        for line in files[-1].read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("mode") != "eval":
                continue
            epoch = 0 if row.get("epoch") is None else int(row["epoch"]) + 1
            curves["epoch"].append(epoch)
            curves["val_force_mae"].append(1000.0 * row["mae_f"] if "mae_f" in row else None)
            _layer_curves(curves, row, epoch)
        return curves

    def models(self, run: Run) -> tuple:
        import torch

        model_path = run.directory / f"{run.name}.model"
        if not model_path.exists():
            raise CompareError(f"the run wrote no model ({model_path.name})")
        model = torch.load(model_path, map_location=self.device, weights_only=False).eval()
        # MACE keeps one checkpoint, the best so far: its epoch is the saved model's
        kept = [int(m.group(1)) for p in (run.directory / "checkpoints").glob("*.pt")
                if (m := re.search(r"_epoch-(\d+)", p.name))]
        run.model_epoch = max(kept) + 1 if kept else None
        if not run.relaxed:
            return model, None
        exported_path = run.directory / f"{run.name}_exported.model"
        if exported_path.exists():
            exported = torch.load(exported_path, map_location=self.device, weights_only=False).eval()
        else:  # relax.export: none in the config: export here, as the run would have
            import equirelax

            exported = equirelax.export(copy.deepcopy(model), mode="merge")
        return exported, model

    def predict(self, model, frames):
        import torch
        from mace.tools import AtomicNumberTable

        from ..adapters.mace import mace_batch

        dtype = next(model.parameters()).dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # MACE builds batches in the default dtype
        try:
            table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
            cutoff = float(model.r_max)
            energies, forces = [], []
            for start in range(0, len(frames), EVALUATION_BATCH):
                chunk = frames[start:start + EVALUATION_BATCH]
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                         for k, v in mace_batch(chunk, table, cutoff).items()}
                out = model(batch, training=False, compute_force=True)
                energies += out["energy"].detach().cpu().double().tolist()
                ptr = batch["ptr"].tolist()
                predicted = out["forces"].detach().cpu().double().numpy()
                forces += [predicted[ptr[i]:ptr[i + 1]] for i in range(len(chunk))]
            equivariance = self._equivariance(model, frames[:EQUIVARIANCE_CONFIGURATIONS], table, cutoff)
        finally:
            torch.set_default_dtype(previous)
        return energies, forces, equivariance

    def _equivariance(self, model, frames, table, cutoff):
        import torch

        from ..adapters.mace import mace_batch, mace_equivariance_error

        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                 for k, v in mace_batch(frames, table, cutoff).items()}
        error = mace_equivariance_error(model, batch, n_rotations=3, generator=torch.Generator().manual_seed(0))
        return {"energy": error["energy"]["max"], "forces": error["forces"]["max"]}


class NequipHost:
    name = "nequip"

    def __init__(self, config_path: Path, options):
        config = _resolve_nested_paths(_load_yaml(config_path), Path.cwd())
        module = config.get("training_module")
        if not isinstance(module, dict) or not isinstance(module.get("model"), dict):
            raise CompareError(f"equirelax: {config_path} has no training_module.model: is it a nequip-train config?")
        model = module["model"]
        if model.get("_target_") == RELAXED_MODEL_TARGET:
            self.relax_settings = {k: v for k, v in model.items() if k not in ("_target_", "model")}
            self.inner_model = model["model"]
        else:
            self.relax_settings, self.inner_model = {}, model
        trainer = config.setdefault("trainer", {})
        callbacks = list(trainer.get("callbacks") or [])
        ours = [c for c in callbacks if isinstance(c, dict) and c.get("_target_") == CALLBACK_TARGET]
        self.callback_settings = {k: v for k, v in (ours[0] if ours else {}).items() if k != "_target_"}
        trainer["callbacks"] = [c for c in callbacks if c not in ours]
        if options.epochs is not None:
            trainer["max_epochs"] = options.epochs
        if options.seed is not None:
            config["seed"] = options.seed
        self.config = config
        self.epochs = trainer.get("max_epochs")
        data = config.get("data") or {}
        self.test_file = options.test_file or data.get("test_file_path")
        mapping = {v: k for k, v in (data.get("key_mapping") or {}).items()}
        self.energy_key = mapping.get("total_energy", "energy")
        self.forces_key = mapping.get("forces", "forces")
        self.device = options.device or ("cuda" if trainer.get("accelerator") in ("gpu", "cuda") else "cpu")

    def relax_section(self, controller: str, options: dict) -> dict:
        settings = {k: v for k, v in self.relax_settings.items() if k not in ("controller", "options")}
        return {"controller": controller, "options": {**self.relax_settings.get("options", {}), **options},
                **settings}

    def check(self, controller: str, options: dict) -> None:
        from ..core.controllers import get_controller

        section = self.relax_section(controller, options)
        controller_options = dict(section["options"])
        if controller == "cr":
            controller_options.setdefault("epochs", 1)  # the run takes it from trainer.max_epochs
        get_controller(controller, **controller_options)

    def command(self, run: Run, options: dict) -> list[str]:
        from .nequip_config import relaxed, write_config

        config = copy.deepcopy(self.config)
        trainer = config["trainer"]
        model = copy.deepcopy(self.inner_model)
        if run.relaxed:
            section = self.relax_section(run.controller, options)
            model = relaxed(model, section.pop("controller"), section.pop("options"), **section)
            trainer["callbacks"].append({"_target_": CALLBACK_TARGET, **self.callback_settings})
        config["training_module"]["model"] = model
        trainer["callbacks"].append({"_target_": "equirelax.plugins.compare_child.NequipEpochTimer",
                                     "path": str(run.directory / "epochs.json")})
        trainer["logger"] = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run.directory),
                             "name": "csv", "version": 0}
        write_config(run.directory, "config", config)
        return [sys.executable, "-m", "equirelax.plugins.compare_child", "nequip", str(run.directory),
                "-cp", str(run.directory), "-cn", "config", f"hydra.run.dir={run.directory}"]

    def curves(self, run: Run) -> dict:
        import csv

        curves = {"epoch": [], "val_force_mae": [], "gamma": {}, "breaking": {}}
        path = run.directory / "csv" / "version_0" / "metrics.csv"
        if not path.exists():
            return curves
        with open(path, encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        force_column = next((c for c in (rows[0] if rows else {}) if re.fullmatch(r"val0?_epoch/forces_mae", c)),
                            None)
        for row in rows:
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"])) + 1
            if force_column and row.get(force_column):
                curves["epoch"].append(epoch)
                curves["val_force_mae"].append(1000.0 * float(row[force_column]))
            _layer_curves(curves, row, epoch)
        return curves

    def _checkpoint(self, run: Run) -> Path:
        record = run.directory / "epochs.json"
        if record.exists():
            best = json.loads(record.read_text()).get("best_checkpoint")
            if best and Path(best).exists():
                return Path(best)
        for name in ("best.ckpt", "last.ckpt"):
            if (run.directory / name).exists():
                return run.directory / name
        raise CompareError("the run wrote no checkpoint (add a ModelCheckpoint callback to the config)")

    def models(self, run: Run) -> tuple:
        import torch

        import equirelax

        from .nequip import load_checkpoint_models

        checkpoint = self._checkpoint(run)
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=False).get("epoch")
        run.model_epoch = None if epoch is None else int(epoch) + 1
        model = load_checkpoint_models(checkpoint)["sole_model"].to(self.device).eval()
        if not run.relaxed:
            return model, None
        # the same model `equirelax export --host nequip` writes: the checkpoint's weights, branches merged
        return equirelax.export(copy.deepcopy(model), mode="merge"), model

    def predict(self, model, frames):
        import torch

        from ..adapters.nequip import OUTPUT_KEYS, nequip_batch, nequip_equivariance_error

        type_names = list(model.type_names)
        r_max = float(model.metadata["r_max"])
        energies, forces = [], []
        for start in range(0, len(frames), EVALUATION_BATCH):
            chunk = frames[start:start + EVALUATION_BATCH]
            batch = {k: v.to(self.device) for k, v in nequip_batch(chunk, type_names, r_max).items()
                     if k not in OUTPUT_KEYS}
            with torch.enable_grad():
                out = model(batch)
            energies += out["total_energy"].detach().cpu().double().view(-1).tolist()
            counts = batch["num_atoms"].tolist()
            predicted = out["forces"].detach().cpu().double().numpy()
            offsets = [0]
            for count in counts:
                offsets.append(offsets[-1] + count)
            forces += [predicted[offsets[i]:offsets[i + 1]] for i in range(len(chunk))]
        probe = {k: v.to(self.device) for k, v in
                 nequip_batch(frames[:EQUIVARIANCE_CONFIGURATIONS], type_names, r_max).items()}
        error = nequip_equivariance_error(model, probe, n_rotations=3, generator=torch.Generator().manual_seed(0))
        return energies, forces, {"energy": error["energy"]["max"], "forces": error["forces"]["max"]}


HOSTS = {"mace": MaceHost, "nequip": NequipHost}


# ----------------------------------------------------------------------- running
def _stream(command: list[str], directory: Path, quiet: bool) -> int:
    """Run ``command`` in ``directory``, its output to ``output.log`` and (unless quiet) the terminal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(directory / "output.log", "wb") as log:
        process = subprocess.Popen(command, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            log.write(chunk)
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        return process.wait()


def _failure_message(directory: Path, returncode: int) -> str:
    text = (directory / "output.log").read_text(errors="replace") if (directory / "output.log").exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("equirelax:")]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    detail = (ours or errors or lines or ["no output"])[-1]
    return f"exit code {returncode}: {detail[:300]}"


def _evaluate(host, model, frames, reference) -> dict:
    import numpy as np

    energies, forces, equivariance = host.predict(model, frames)
    ref_energies, ref_forces = reference
    per_atom = np.array([(e - r) / len(f) for e, r, f in zip(energies, ref_energies, ref_forces)])
    force_error = np.concatenate([(p - r).ravel() for p, r in zip(forces, ref_forces)])
    return {
        "energy_mae_mev_per_atom": float(1000 * np.abs(per_atom).mean()),
        "energy_rmse_mev_per_atom": float(1000 * np.sqrt((per_atom**2).mean())),
        "force_mae_mev_per_a": float(1000 * np.abs(force_error).mean()),
        "force_rmse_mev_per_a": float(1000 * np.sqrt((force_error**2).mean())),
        "equivariance_error": equivariance,
    }


def _finish(host, run: Run, frames, reference) -> None:
    import statistics

    epochs_record = run.directory / "epochs.json"
    if epochs_record.exists():
        seconds = json.loads(epochs_record.read_text()).get("epoch_seconds") or []
        if seconds:
            run.seconds_per_epoch = statistics.median(seconds)
    resources = run.directory / "resources.json"
    if resources.exists():
        record = json.loads(resources.read_text())
        run.peak_memory_mb, run.peak_gpu_memory_mb = record.get("peak_rss_mb"), record.get("peak_gpu_mb")
    run.curves = host.curves(run)
    equivariant, relaxed = host.models(run)
    run.test["equivariant"] = _evaluate(host, equivariant, frames, reference)
    if relaxed is not None:
        from ..core.metrics import symmetry_breaking

        with symmetry_breaking(relaxed) as breaking:
            run.test["relaxed"] = _evaluate(host, relaxed, frames, reference)
        run.gamma = _relaxed_levels(relaxed)
        run.breaking = breaking


def compare(host_name: str, config_path: Path, out: Path, controllers=DEFAULT_CONTROLLERS, *, epochs=None,
            seed=None, test_file=None, controller_options=None, device=None, quiet=False) -> dict:
    """Run and evaluate every controller; write the report. Returns the results dict."""
    from ase.io import read

    if host_name not in HOSTS:
        raise CompareError(f"equirelax: unknown host {host_name!r}; choose one of {sorted(HOSTS)}")
    controllers = list(controllers)
    if not controllers:
        raise CompareError("equirelax: --controllers needs at least one entry")
    duplicates = sorted({c for c in controllers if controllers.count(c) > 1})
    if duplicates:
        raise CompareError(f"equirelax: controller(s) {duplicates} listed twice")
    controller_options = dict(controller_options or {})
    unknown = sorted(set(controller_options) - set(controllers))
    if unknown:
        raise CompareError(f"equirelax: --controller-options names {unknown}, which are not in --controllers")
    if "vanilla" in controller_options:
        raise CompareError("equirelax: --controller-options: vanilla is the host's own training and takes no options")
    options = _Options(epochs=epochs, seed=seed, test_file=test_file, device=device)
    host = HOSTS[host_name](Path(config_path), options)
    if not host.test_file:
        raise CompareError("equirelax: compare evaluates on a test set: give the config one "
                           f"({'test_file' if host_name == 'mace' else 'data.test_file_path'}) or pass --test-file")
    test_path = Path(host.test_file)
    test_path = test_path if test_path.is_absolute() else Path.cwd() / test_path
    if not test_path.is_file():
        raise CompareError(f"equirelax: no test file at {test_path} (relative paths in the config are taken from "
                           "the directory compare runs in)")
    for controller in controllers:  # unknown controllers and bad options stop here, before any training
        if controller != "vanilla":
            if not isinstance(controller_options.get(controller, {}), dict):
                raise CompareError(f"equirelax: --controller-options for {controller!r} must be a mapping")
            try:
                host.check(controller, controller_options.get(controller, {}))
            except (ValueError, TypeError, KeyError) as error:
                message = str(error).strip("'\"")
                raise CompareError(message if message.startswith("equirelax") else
                                   f"equirelax: controller {controller!r}: {message}") from None
    if importlib.util.find_spec(host_name) is None:
        raise CompareError(f"equirelax: compare --host {host_name} needs {host_name} in this environment: "
                           f"pip install 'equirelax[{host_name}]'")
    frames = read(str(test_path), ":")
    reference = _read_reference(frames, host.energy_key, host.forces_key)

    out = Path(out).resolve()
    runs = []
    for index, controller in enumerate(controllers, 1):
        directory = out / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", controller)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        run = Run(controller, None if controller == "vanilla" else controller, directory)
        runs.append(run)
        print(f"equirelax compare [{index}/{len(controllers)}] {controller}: {host_name} training "
              f"(log: {directory / 'output.log'})", flush=True)
        start = time.perf_counter()
        try:
            returncode = _stream(host.command(run, controller_options.get(controller, {})), directory, quiet)
        except OSError as error:
            returncode, run.error = -1, f"could not start: {error}"
        run.wall_seconds = time.perf_counter() - start
        if returncode != 0:
            run.status = "failed"
            run.error = run.error or _failure_message(directory, returncode)
            print(f"equirelax compare: {controller} failed ({run.error})", flush=True)
            continue
        try:
            _finish(host, run, frames, reference)
            run.status = "ok"
        except Exception as error:  # noqa: BLE001  (one run's evaluation failing must not lose the others)
            run.status = "failed"
            run.error = f"evaluation: {type(error).__name__}: {error}"
            print(f"equirelax compare: evaluating {controller} failed ({run.error})", flush=True)

    results = {
        "host": host_name, "config": str(Path(config_path).resolve()), "test_file": str(test_path),
        "test_configurations": len(frames), "epochs": host.epochs, "seed": host.config.get("seed"),
        "controllers": controllers, "controller_options": controller_options,
        "runs": [_json_run(run) for run in runs],
    }
    write_report(results, out)
    return results


@dataclass
class _Options:
    epochs: int | None
    seed: int | None
    test_file: str | None
    device: str | None


def _json_run(run: Run) -> dict:
    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return _finite_or_none(node)

    record = asdict(run)
    record["directory"] = str(run.directory)
    record["relaxed_run"] = run.relaxed
    return clean(record)


# ------------------------------------------------------------------------ report
def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def _metric(run: dict, model: str, key: str):
    return (run["test"].get(model) or {}).get(key)


def table(results: dict) -> str:
    header = ("| run | status | force MAE (meV/Å): equivariant / relaxed | force RMSE: equivariant / relaxed "
              "| energy MAE (meV/atom): equivariant / relaxed | equivariance error (forces): equivariant / relaxed "
              "| model epoch | γ per layer | symmetry breaking per layer | s / epoch | peak memory (MB) |")
    lines = [header, "|" + "---|" * 11]
    prefix = _common_prefix([name for run in results["runs"] for name in run["gamma"]])
    for run in results["runs"]:
        if run["status"] != "ok":
            lines.append(f"| {run['name']} | **failed**: {run['error']} | - | - | - | - | - | - | - | - | - |")
            continue

        def pair(key, spec=".1f"):
            return f"{_fmt(_metric(run, 'equivariant', key), spec)} / {_fmt(_metric(run, 'relaxed', key), spec)}"

        eq = [(run["test"].get(m) or {}).get("equivariance_error", {}).get("forces") for m in ("equivariant", "relaxed")]
        gamma = ", ".join(f"{name[len(prefix):]}: {value:.3f}" for name, value in run["gamma"].items()) or "-"
        breaking = ", ".join(f"{name[len(prefix):]}: {value:.3f}"
                             for name, value in (run.get("breaking") or {}).items()) or "-"
        memory = _fmt(run["peak_memory_mb"], ".0f")
        if run.get("peak_gpu_memory_mb") is not None:
            memory += f" (GPU {run['peak_gpu_memory_mb']:.0f})"
        lines.append(
            f"| {run['name']} | ok | {pair('force_mae_mev_per_a')} | {pair('force_rmse_mev_per_a')} "
            f"| {pair('energy_mae_mev_per_atom', '.2f')} | {_fmt(eq[0], '.1e')} / {_fmt(eq[1], '.1e')} "
            f"| {_fmt(run['model_epoch'], 'd')} | {gamma} | {breaking} | {_fmt(run['seconds_per_epoch'], '.2f')} "
            f"| {memory} |"
        )
    return "\n".join(lines)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every layer name shares (``model.func.``), left out of the table."""
    if len(set(names)) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    return ".".join(shared) + "." if shared else ""


def reading(results: dict) -> list[str]:
    """A few plain sentences on what the table says, computed from it."""
    runs = {run["name"]: run for run in results["runs"]}
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    lines = []
    failed = [run for run in results["runs"] if run["status"] != "ok"]
    for run in failed:
        lines.append(f"`{run['name']}` failed ({run['error']}); its log is `{run['directory']}/output.log`.")
    if not ok:
        return lines + ["No run finished, so there is nothing to compare."]
    vanilla = runs.get("vanilla")
    base = _metric(vanilla, "equivariant", "force_mae_mev_per_a") if vanilla and vanilla["status"] == "ok" else None
    candidates = [(_metric(run, model, "force_mae_mev_per_a"), run["name"], model)
                  for run in ok for model in ("equivariant", "relaxed") if run["test"].get(model)]
    candidates = [c for c in candidates if c[0] is not None]
    if candidates:
        best = min(candidates)
        which = "model" if best[1] == "vanilla" else f"{best[2]} model"
        lines.append(f"Lowest test force MAE: `{best[1]}` ({which}), {best[0]:.1f} meV/Å.")
    if base is not None:
        lines.append(f"Vanilla {results['host']} training: test force MAE {base:.1f} meV/Å.")
        for model, label in (("relaxed", "Relaxed models"), ("equivariant", "Exported (exactly equivariant) models")):
            rows = [(run["name"], _metric(run, model, "force_mae_mev_per_a")) for run in ok if run["relaxed_run"]]
            rows = [(name, value) for name, value in rows if value is not None]
            if not rows:
                continue
            below = [f"`{n}` ({100 * (v / base - 1):+.1f}%)" for n, v in rows if v < base]
            above = [f"`{n}` ({100 * (v / base - 1):+.1f}%)" for n, v in rows if v >= base]
            text = f"{label} vs vanilla: below vanilla: {', '.join(below) or 'none'}"
            text += f"; not below vanilla: {', '.join(above)}." if above else "."
            lines.append(text)
        winners = [run["name"] for run in ok if run["relaxed_run"]
                   and (_metric(run, "relaxed", "force_mae_mev_per_a") or math.inf) < base]
        if not winners:
            lines.append("No relaxed run beat vanilla on test force MAE with this budget.")
    exported = [(run["test"]["equivariant"].get("equivariance_error") or {}).get("forces")
                for run in ok if run["test"].get("equivariant")]
    exported = [e for e in exported if e is not None]
    if exported:
        lines.append(f"Every equivariant model (vanilla, exported) is equivariant to {max(exported):.1e} "
                     "(largest relative force error under 3 random O(3) rotations).")
    kept, closed = [], []
    for run in ok:
        if run["gamma"]:
            largest = max(abs(g) for g in run["gamma"].values())
            (kept if largest > 1e-3 else closed).append(f"`{run['name']}` (max |γ| {largest:.3f})")
    if closed:
        lines.append(f"Ended exactly equivariant (γ ≈ 0 on every layer): {', '.join(closed)}.")
    for run in ok:  # controllers that close by the end of the run, saved by the host before it
        epochs, saved = results.get("epochs"), run.get("model_epoch")
        if run.get("controller") not in ("cr", "ace") or not run["gamma"] or not epochs or saved is None \
                or saved >= epochs:
            continue
        level = max(abs(g) for g in run["gamma"].values())
        if run["controller"] == "cr":
            at, end = f"trained at θ = {level:.2f}", "the schedule ended (θ = 0"
        else:
            at, end = f"at |γ| up to {level:.2f}", "the controller closed (γ = 0"
        lines.append(f"`{run['name']}`: the host kept its epoch-{saved} model (lowest validation loss), {at}, "
                     f"before {end} at epoch {epochs}); its exported model is that model's projection.")
    if kept:
        lines.append(f"Ended with γ > 0 somewhere (still relaxed; the exported model is their equivariant "
                     f"projection): {', '.join(kept)}.")
    return lines


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plots = _plots(results, out)
    lines = [
        f"# equirelax compare: {results['host']}",
        "",
        f"Config `{results['config']}`, {results['epochs']} epochs, seed {results['seed']}; test set "
        f"`{results['test_file']}` ({results['test_configurations']} configurations). "
        "\"equivariant\" is the vanilla model or a relaxed run's exported model (branches merged), "
        "\"relaxed\" the model with its branches. Equivariance error: largest relative force error under "
        "3 random O(3) rotations. Every model is the one the host saved (MACE: lowest validation loss; "
        "NequIP: the config's checkpoint callback), trained for \"model epoch\" epochs; γ is that model's. "
        "Time: median training seconds per epoch (validation excluded).",
        "",
        table(results),
        "",
        "## Reading",
        "",
        *[f"- {line}" for line in reading(results)],
        "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for run in ok:
        points = [(e, v) for e, v in zip(run["curves"].get("epoch", []), run["curves"].get("val_force_mae", []))
                  if v is not None]
        if points:
            axis.plot(*zip(*points), marker=".", label=run["name"])
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation force MAE (meV/Å)")
    axis.set_title("validation curves")
    if axis.lines:
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "validation.png", dpi=100)
    plt.close(figure)
    written.append("validation.png")

    relaxed = [run for run in ok if run["curves"].get("gamma")]
    if relaxed:
        # top row γ, bottom row the symmetry map ‖γ·P⊥f_neq‖ / ‖f_eq‖ (what γ means for the layer's output)
        figure, axes = plt.subplots(2, len(relaxed), figsize=(3.2 * len(relaxed), 6.0), squeeze=False, sharey="row")
        for column, run in enumerate(relaxed):
            for row, quantity in enumerate(("gamma", "breaking")):
                axis = axes[row][column]
                for layer, points in (run["curves"].get(quantity) or {}).items():
                    axis.plot(*zip(*points), marker=".", label=layer)
                axis.set_xlabel("epoch")
            axes[0][column].set_title(run["name"])
        axes[0][0].set_ylabel("γ")
        axes[1][0].set_ylabel("symmetry breaking")
        axes[0][-1].legend(fontsize="x-small")
        figure.tight_layout()
        figure.savefig(out / "gamma.png", dpi=100)
        plt.close(figure)
        written.append("gamma.png")
    return written


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--host", choices=sorted(HOSTS), required=True)
    parser.add_argument("--config", type=Path, required=True,
                        help="your host config: a MACE YAML config, or a nequip-train config file")
    parser.add_argument("--controllers", nargs="+", default=list(DEFAULT_CONTROLLERS),
                        help="runs to compare: vanilla and controller names (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("compare-output"),
                        help="directory for the runs and the report (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's number of epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--test-file", default=None, help="test set (default: the config's)")
    parser.add_argument("--controller-options", default="{}",
                        help="JSON: options per controller, e.g. '{\"recm\": {\"probe_every\": 8}}'")
    parser.add_argument("--device", default=None, help="device for the evaluation (default: the config's)")
    parser.add_argument("--quiet", action="store_true", help="host logs only to each run's output.log")


def main(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise CompareError("equirelax: --epochs must be at least 1")
    try:
        options = json.loads(args.controller_options)
    except json.JSONDecodeError as error:
        raise CompareError(f"equirelax: --controller-options is not valid JSON: {error}") from None
    if not isinstance(options, dict):
        raise CompareError("equirelax: --controller-options must be a JSON object {controller: {option: value}}")
    results = compare(args.host, args.config, args.out, args.controllers, epochs=args.epochs, seed=args.seed,
                      test_file=args.test_file, controller_options=options, device=args.device, quiet=args.quiet)
    print()
    print(table(results))
    print()
    for line in reading(results):
        print(f"- {line}")
    out = Path(args.out).resolve()
    print(f"\nreport: {out / 'report.md'} (results.json, validation.png, gamma.png next to it)")
    return 1 if any(run["status"] != "ok" for run in results["runs"]) else 0
