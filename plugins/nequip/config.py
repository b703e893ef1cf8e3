"""A small ``nequip-train`` config for the generated EMT data, plain or with the equirelax entries.

Used by ``equirelax pretrain --host nequip``, ``equirelax compare`` and the
tests; the README shows the same entries added to a config by hand.
"""

from __future__ import annotations

from pathlib import Path

KEY_MAPPING = {"REF_energy": "total_energy", "REF_forces": "forces"}
RELAXED_MODEL_TARGET = "equirelax.plugins.nequip.RelaxedModel"
CALLBACK_TARGET = "equirelax.plugins.nequip.EquirelaxCallback"
# RelaxedModel's keyword arguments besides the model: what the shared relax-settings check accepts
RELAX_KEYS = ("controller", "targets", "branch", "rank", "init", "init_std", "group", "on_nonfinite", "options",
              "seed")


def model_config(num_features: int = 16, num_layers: int = 2, l_max: int = 1, cutoff: float = 4.5,
                 dtype: str = "float64") -> dict:
    return {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": "${seed}",
        "model_dtype": dtype,
        "type_names": "${model_type_names}",
        "r_max": cutoff,
        "l_max": l_max,
        "parity": True,
        "num_layers": num_layers,
        "num_features": num_features,
        "radial_mlp_depth": 1,
        "radial_mlp_width": 16,
        "avg_num_neighbors": "${training_data_stats:num_neighbors_mean}",
        "per_type_energy_shifts": "${training_data_stats:per_atom_energy_mean}",
        "per_type_energy_scales": "${training_data_stats:forces_rms}",
    }


def relaxed(model: dict, controller: str, options: dict | None = None, **relax_kwargs) -> dict:
    """``model`` wrapped in ``equirelax.plugins.nequip.RelaxedModel``."""
    return {"_target_": RELAXED_MODEL_TARGET, "controller": controller,
            "options": {} if options is None else options, **relax_kwargs, "model": model}


def training_config(
    train_file: str,
    test_file: str | None = None,
    *,
    model: dict | None = None,
    relax: dict | None = None,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 4,
    seed: int = 1,
    val_fraction: float = 0.2,
    type_names=("Al", "Cu"),
    cutoff: float = 4.5,
    energy_weight: float = 1.0,
    forces_weight: float = 10.0,
    ema: bool = False,
    logger_dir: str | None = "${hydra:runtime.output_dir}",
    callbacks: list | None = None,
) -> dict:
    """A complete ``nequip-train`` config dict; ``relax`` (``relaxed()`` keyword arguments minus ``model``)
    adds the two equirelax entries."""
    model = model or model_config(cutoff=cutoff)
    dataloader = {"_target_": "torch.utils.data.DataLoader", "batch_size": batch_size}
    transforms = [
        {"_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
         "model_type_names": "${model_type_names}",
         "chemical_species_to_atom_type_map": "${list_to_identity_dict:${model_type_names}}"},
        {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": cutoff},
    ]
    data = {
        "_target_": "nequip.data.datamodule.ASEDataModule",
        "seed": "${seed}",
        "split_dataset": {"file_path": str(train_file), "train": 1.0 - val_fraction, "val": val_fraction},
        "transforms": transforms,
        "key_mapping": dict(KEY_MAPPING),
        "train_dataloader": {**dataloader, "shuffle": True},
        "val_dataloader": dataloader,
        "test_dataloader": dataloader,
        "stats_manager": {"_target_": "nequip.data.CommonDataStatisticsManager",
                          "type_names": "${model_type_names}"},
    }
    if test_file is not None:
        data["test_file_path"] = str(test_file)
    callbacks = list(callbacks or [])
    callbacks += [
        {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "monitor": "val0_epoch/weighted_sum",
         "dirpath": "${hydra:runtime.output_dir}", "filename": "best", "save_top_k": 1, "save_last": False},
        # unmonitored, so last.ckpt always holds the final epoch (for restarts)
        {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "dirpath": "${hydra:runtime.output_dir}",
         "filename": "latest", "save_top_k": 1, "save_last": True},
    ]
    if relax is not None:
        relax = dict(relax)
        model = relaxed(model, **relax)
        callbacks.append({"_target_": CALLBACK_TARGET})
    trainer = {
        "_target_": "lightning.Trainer", "max_epochs": epochs, "check_val_every_n_epoch": 1,
        "log_every_n_steps": 1, "enable_progress_bar": False, "accelerator": "cpu", "callbacks": callbacks,
    }
    if logger_dir is not None:
        trainer["logger"] = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": logger_dir,
                             "name": "csv", "version": 0}
    metrics = {"_target_": "nequip.train.EnergyForceMetrics",
               "coeffs": {"total_energy_mae": 1.0, "forces_mae": 1.0}}
    module = {
        "_target_": "nequip.train.EMALightningModule" if ema else "nequip.train.NequIPLightningModule",
        "loss": {"_target_": "nequip.train.EnergyForceLoss", "per_atom_energy": True,
                 "coeffs": {"total_energy": energy_weight, "forces": forces_weight}},
        "val_metrics": metrics,
        "test_metrics": metrics,
        "optimizer": {"_target_": "torch.optim.Adam", "lr": lr},
        "model": model,
    }
    return {
        "run": ["train", "test"] if test_file is not None else ["train"],
        "seed": seed,
        "model_type_names": list(type_names),
        "data": data,
        "trainer": trainer,
        "training_module": module,
    }


def write_config(directory, name: str, config: dict) -> Path:
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    path.write_text(yaml.dump(config, Dumper=NoAliases, sort_keys=False))
    return path
