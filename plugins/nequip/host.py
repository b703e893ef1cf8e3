"""NequIP for the tools: how ``equirelax compare`` trains and evaluates a ``nequip-train`` config, and how
``pretrain`` and ``export`` run.

Each compare run is ``python -m equirelax.plugins.nequip.host RUN_DIR <nequip-train arguments>``: ``nequip-train``
with the peak memory recorded (``resources.json``); the run's config gets ``NequipEpochTimer``, which times the
training pass of each epoch (``epochs.json``) and records the checkpoint the config's checkpoint callback kept.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ...core.hosts import (
    EQUIVARIANCE_CONFIGURATIONS,
    EVALUATION_BATCH,
    EpochTimer,
    Host,
    HostConfigError,
    absolute_if_file,
    empty_curves,
    layer_curves,
    load_yaml_config,
    looks_like_file,
    missing_file,
    write_resources,
)
from .config import CALLBACK_TARGET, RELAX_KEYS, RELAXED_MODEL_TARGET

EPOCH_TIMER_TARGET = "equirelax.plugins.nequip.host.NequipEpochTimer"


def _resolve_nested_paths(node, base: Path):
    """Relative file paths in a NequIP config (keys ending in ``_path``) made absolute."""
    if isinstance(node, dict):
        return {k: (absolute_if_file(v, base) if isinstance(k, str) and k.endswith("_path") and isinstance(v, str)
                    else _resolve_nested_paths(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_nested_paths(v, base) for v in node]
    return node


class NequipHost(Host):
    name = "nequip"
    package = "nequip"
    extra = "nequip"
    config_help = "a nequip-train config file"
    test_file_key = "data.test_file_path"
    saved_model = "chosen by the config's checkpoint callback"
    can_export = True

    def __init__(self, config_path: Path, options):
        config = _resolve_nested_paths(load_yaml_config(config_path), Path.cwd())
        module = config.get("training_module")
        if not isinstance(module, dict) or not isinstance(module.get("model"), dict):
            raise HostConfigError(f"equirelax: {config_path} has no training_module.model: is it a nequip-train "
                                  "config?")
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
        from ...core.settings import validate_relax_settings

        validate_relax_settings(self.relax_section(controller, options), keys=RELAX_KEYS)

    def own_test_set(self):
        data = self.config.get("data") or {}
        splits = data.get("split_dataset") or []
        splits = [splits] if isinstance(splits, dict) else splits
        described = [f"split_dataset.test of {split.get('file_path') or 'its dataset'}"
                     for split in splits if isinstance(split, dict) and "test" in split]
        if data.get("test_dataset"):
            described.insert(0, "test_dataset")
        return f"NequIP's own test set (data.{' + data.'.join(described)})" if described else None

    def own_test_frames(self):
        """NequIP's own test datasets, built by its data module from the config (the same split its test uses)."""
        import numpy as np
        from hydra.utils import instantiate
        from nequip.data.ase import to_ase
        from omegaconf import OmegaConf

        import nequip.utils.resolvers  # noqa: F401  (NequIP's config resolvers, e.g. list_to_identity_dict)

        config = OmegaConf.create({k: v for k, v in self.config.items() if k not in ("trainer", "training_module")})
        data = OmegaConf.to_container(config.data, resolve=True)
        data.pop("stats_manager", None)  # statistics are for the model, not the test set
        datamodule = instantiate(data, _recursive_=False)
        datamodule.setup("test")
        frames = []
        for dataset in datamodule.test_dataset:
            for index in range(len(dataset)):
                for atoms in to_ase(dataset[index]):
                    results, atoms.calc = atoms.calc.results, None  # NequIP keeps energy as a [1] array
                    atoms.info[self.energy_key] = float(np.asarray(results["energy"]).reshape(-1)[0])
                    atoms.arrays[self.forces_key] = np.asarray(results["forces"], dtype=float)
                    frames.append(atoms)
        return frames

    def check_inputs(self) -> None:
        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(key, str) and key.endswith("_path") and looks_like_file(value) \
                            and not Path(value).exists():
                        raise missing_file(key, value)
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk({k: v for k, v in self.config.items() if k != "hydra"})

    def command(self, run) -> list[str]:
        from .config import relaxed, write_config

        config = copy.deepcopy(self.config)
        trainer = config["trainer"]
        model = copy.deepcopy(self.inner_model)
        if run.relaxed:
            section = self.relax_section(run.controller, run.options)
            model = relaxed(model, section.pop("controller"), section.pop("options"), **section)
            trainer["callbacks"].append({"_target_": CALLBACK_TARGET, **self.callback_settings})
        config["training_module"]["model"] = model
        trainer["callbacks"].append({"_target_": EPOCH_TIMER_TARGET, "path": str(run.directory / "epochs.json")})
        trainer["logger"] = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run.directory),
                             "name": "csv", "version": 0}
        write_config(run.directory, "config", config)
        return [sys.executable, "-m", "equirelax.plugins.nequip.host", str(run.directory),
                "-cp", str(run.directory), "-cn", "config", f"hydra.run.dir={run.directory}"]

    def curves(self, run) -> dict:
        import csv

        curves = empty_curves()
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
            layer_curves(curves, row, epoch)
        return curves

    def _checkpoint(self, run) -> Path:
        record = run.directory / "epochs.json"
        if record.exists():
            best = json.loads(record.read_text()).get("best_checkpoint")
            if best and Path(best).exists():
                return Path(best)
        for name in ("best.ckpt", "last.ckpt"):
            if (run.directory / name).exists():
                return run.directory / name
        raise HostConfigError("the run wrote no checkpoint (add a ModelCheckpoint callback to the config)")

    def models(self, run) -> tuple:
        import torch

        from ...core.patching import export
        from .training import load_checkpoint_models

        checkpoint = self._checkpoint(run)
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=False).get("epoch")
        run.model_epoch = None if epoch is None else int(epoch) + 1
        model = load_checkpoint_models(checkpoint)["sole_model"].to(self.device).eval()
        if not run.relaxed:
            return model, None
        # the same model `equirelax export --host nequip` writes: the checkpoint's weights, branches merged
        return export(copy.deepcopy(model), mode="merge"), model

    def predict(self, model, frames):
        import torch

        from ...adapters.nequip import OUTPUT_KEYS, nequip_batch, nequip_equivariance_error

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

    @classmethod
    def pretrain(cls, out: Path, train_file: Path, epochs: int, seed: int, test_file: Path | None = None) -> Path:
        from .config import training_config, write_config

        config = training_config(str(Path(train_file).resolve()), None if test_file is None else str(test_file),
                                 epochs=epochs, seed=seed, logger_dir=None)
        write_config(out, "pretrain", config)
        train = os.path.join(os.path.dirname(sys.executable), "nequip-train")
        result = subprocess.run([train, "-cp", str(out.resolve()), "-cn", "pretrain",
                                 f"hydra.run.dir={(out / 'pretrain_run').resolve()}"], cwd=out)
        if result.returncode:
            sys.exit(f"equirelax: NequIP pretraining failed (exit {result.returncode}); see {out / 'pretrain_run'}")
        shutil.copy(out / "pretrain_run" / "best.ckpt", out / "pretrained.ckpt")
        return out / "pretrained.ckpt"

    @classmethod
    def deploy(cls, checkpoint: Path, out: Path | None) -> str:
        raise NotImplementedError(
            "equirelax: NequIP deploys with its own packager, which takes a relaxed checkpoint as it is: "
            f"nequip-package build {checkpoint} {out or 'relaxed.nequip.zip'} (the relaxed layers are packaged "
            "frozen, γ and branches kept; NequIPCalculator runs the package without equirelax)")

    @classmethod
    def export(cls, checkpoint: Path, out: Path, mode: str) -> str:
        from .training import export_checkpoint

        export_checkpoint(checkpoint, out, mode)
        return (f"wrote plain NequIP checkpoint ({mode}) to {out}; package it with "
                f"nequip-package build {out} model.nequip.zip")


def _lightning_callback_base():
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the MACE environment has no Lightning; only NequIP configs ask for this callback
        return object
    return Callback


class NequipEpochTimer(_lightning_callback_base()):
    """Lightning callback for compare's NequIP runs: times the training pass of each epoch and
    records which checkpoint the run's checkpoint callback considers best."""

    def __init__(self, path: str):
        super().__init__()
        self.timer = EpochTimer(path)

    def on_train_epoch_start(self, trainer, pl_module):
        self.timer.start()

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.timer.stop()

    def on_train_epoch_end(self, trainer, pl_module):
        self.timer.stop()

    def on_train_end(self, trainer, pl_module):
        callback = trainer.checkpoint_callback
        if callback is not None and callback.best_model_path:
            self.timer.best_checkpoint = callback.best_model_path
        self.timer.write()


def _training(run_dir: str, argv: list[str]) -> None:
    from nequip.scripts.train import main

    sys.argv = ["nequip-train", *argv]
    try:
        main()
    finally:
        write_resources(run_dir)


if __name__ == "__main__":
    _training(sys.argv[1], sys.argv[2:])
