"""SevenNet for the tools: how ``equirelax compare`` trains and evaluates a sevenn ``input.yaml``.

Each compare run is ``python -m equirelax.plugins.sevenn.host RUN_DIR input.yaml -s``: ``equirelax-sevenn`` with the
training pass of each epoch timed (``epochs.json``) and the peak memory recorded (``resources.json``).
"""

from __future__ import annotations

import copy
import csv
import re
import sys
from pathlib import Path

from ...core.hosts import (
    EQUIVARIANCE_CONFIGURATIONS,
    EpochTimer,
    Host,
    HostConfigError,
    absolute_if_file,
    empty_curves,
    load_yaml_config,
    looks_like_file,
    missing_file,
    pop_relax_section,
    write_resources,
)

DATA_KEYS = ("load_trainset_path", "load_validset_path", "load_testset_path")


class SevennHost(Host):
    name = "sevenn"
    package = "sevenn"
    extra = "sevenn"
    config_help = "a sevenn input.yaml"
    test_file_key = "data.load_testset_path"
    saved_model = "lowest validation loss, sevenn's checkpoint_best.pth"

    def __init__(self, config_path: Path, options):
        config = load_yaml_config(config_path)
        if not isinstance(config.get("train"), dict) or not isinstance(config.get("data"), dict):
            raise HostConfigError(f"equirelax: {config_path} has no train: and data: sections: is it a sevenn "
                                  "input.yaml?")
        base = Path.cwd()
        data, train = config["data"], config["train"]
        for key in DATA_KEYS:
            value = data.get(key)
            if isinstance(value, list):
                data[key] = [absolute_if_file(v, base) for v in value]
            elif value is not None:
                data[key] = absolute_if_file(value, base)
        resumed = train.get("continue") or {}
        if resumed.get("checkpoint"):
            resumed["checkpoint"] = absolute_if_file(resumed["checkpoint"], base)
        self.relax_settings = pop_relax_section(config, config_path)
        if options.epochs is not None:
            train["epoch"] = options.epochs
        if options.seed is not None:
            train["random_seed"] = options.seed
        # compare's curves are validation force MAE: make sure sevenn records it
        records = [list(r) for r in train.get("error_record") or [["Energy", "RMSE"], ["Force", "RMSE"],
                                                                   ["TotalLoss", "None"]]]
        if ["Force", "MAE"] not in records:
            records.append(["Force", "MAE"])
        train["error_record"] = records
        self.config = config
        self.epochs = train.get("epoch")
        tests = data.get("load_testset_path")
        tests = tests if isinstance(tests, list) else [tests] if tests else []
        self.test_file = options.test_file or (tests[0] if len(tests) == 1 and looks_like_file(tests[0]) else None)
        self.device = options.device or "cpu"
        reading = data.get("data_format_args") or {}  # where sevenn finds the labels in an ASE file
        self.energy_key = reading.get("energy_key", "energy")
        self.forces_key = reading.get("force_key", "forces")

    @classmethod
    def deploy(cls, checkpoint: Path, out: Path | None) -> str:
        from .checkpoint import deploy_relaxed

        written = deploy_relaxed(checkpoint, out or Path("deployed_serial_relaxed.pt"))
        return (f"wrote {written}: the relaxed model as sevenn_get_model writes a serial LAMMPS model (γ and branches "
                f"kept, TorchScript; pair_style e3gnn, no equirelax needed)")

    @property
    def seed(self):
        return self.config["train"].get("random_seed")

    def check(self, controller: str, options: dict) -> None:
        from ...core.settings import validate_relax_settings
        from .training import RELAX_KEYS

        validate_relax_settings(self.relax_section(controller, options), keys=RELAX_KEYS)

    def check_inputs(self) -> None:
        for key in DATA_KEYS:
            values = self.config["data"].get(key)
            for value in values if isinstance(values, list) else [values]:
                if looks_like_file(value) and not Path(value).exists():
                    raise missing_file(f"data.{key}", value)

    def command(self, run) -> list[str]:
        import yaml

        config = copy.deepcopy(self.config)
        if run.relaxed:
            config["relax"] = self.relax_section(run.controller, run.options)
        (run.directory / "input.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return [sys.executable, "-m", "equirelax.plugins.sevenn.host", str(run.directory), "input.yaml", "-s"]

    def curves(self, run) -> dict:
        curves = empty_curves()
        path = run.directory / "lc.csv"
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    curves["epoch"].append(int(row["epoch"]))
                    value = row.get("validset_Force_MAE")
                    curves["val_force_mae"].append(1000.0 * float(value) if value else None)
        log = run.directory / "log.sevenn"
        if log.exists():  # one equirelax line per training epoch
            lines = [line for line in log.read_text().splitlines() if line.startswith("equirelax: gamma/")]
            for epoch, line in enumerate(lines, 1):
                for quantity, layer, value in re.findall(r"(gamma|breaking)/([^=]+)=([-0-9.e+naif]+)", line):
                    curves[quantity].setdefault(layer, []).append([epoch, float(value)])
        return curves

    def models(self, run) -> tuple:
        import torch
        from sevenn.util import model_from_checkpoint

        best = run.directory / "checkpoint_best.pth"
        if not best.exists():
            raise HostConfigError("the run wrote no checkpoint_best.pth (sevenn needs a validation set for it)")
        run.model_epoch = torch.load(best, map_location="cpu", weights_only=False).get("epoch")
        model, _ = model_from_checkpoint(str(best))
        if not run.relaxed:
            return model.eval(), None
        from ...core.settings import validate_relax_settings
        from .training import RELAX_KEYS, relaxed_model

        settings = validate_relax_settings(self.relax_section(run.controller, run.options), keys=RELAX_KEYS)
        relaxed_path = run.directory / "checkpoint_best_relaxed.pth"
        if not relaxed_path.exists():  # export: none: the best checkpoint is the relaxed one
            from ...core.patching import export

            relaxed = relaxed_model(best, settings).eval()
            return export(copy.deepcopy(relaxed), mode="merge"), relaxed
        return model.eval(), relaxed_model(relaxed_path, settings).eval()

    def predict(self, model, frames):
        import numpy as np
        import torch
        from e3nn import o3
        from sevenn.calculator import SevenNetCalculator

        calculator = SevenNetCalculator(model=model, device=self.device)

        def evaluate(atoms):
            atoms = atoms.copy()
            atoms.calc = calculator
            return float(atoms.get_potential_energy()), np.array(atoms.get_forces(), dtype=float)

        predictions = [evaluate(atoms) for atoms in frames]
        generator = torch.Generator().manual_seed(0)
        energy_errors, force_errors = [], []
        for atoms, (energy, forces) in zip(frames[:EQUIVARIANCE_CONFIGURATIONS], predictions):
            for _ in range(3):
                rotation = o3.angles_to_matrix(*(torch.rand(3, generator=generator, dtype=torch.float64)
                                                 * torch.tensor([2 * np.pi, np.pi, 2 * np.pi]))).numpy()
                rotated = atoms.copy()
                rotated.positions = atoms.positions @ rotation.T
                rotated_energy, rotated_forces = evaluate(rotated)
                energy_errors.append(abs(rotated_energy - energy) / max(abs(energy), 1e-12))
                force_errors.append(np.linalg.norm(rotated_forces - forces @ rotation.T)
                                    / max(np.linalg.norm(forces), 1e-12))
        return ([e for e, _ in predictions], [f for _, f in predictions],
                {"energy": max(energy_errors), "forces": max(force_errors)})


def timed_training(run_dir: str, argv: list[str]) -> None:
    """``equirelax-sevenn argv`` with each epoch's training pass timed into RUN_DIR/epochs.json."""
    from sevenn.train.trainer import Trainer

    from .training import main

    timer = EpochTimer(str(Path(run_dir) / "epochs.json"))
    original = Trainer.run_one_epoch

    def run_one_epoch(trainer, loader, is_train=False, *args, **kwargs):
        if not is_train:
            return original(trainer, loader, is_train, *args, **kwargs)
        timer.start()
        try:
            return original(trainer, loader, is_train, *args, **kwargs)
        finally:
            timer.stop()

    Trainer.run_one_epoch = run_one_epoch
    try:
        main(argv)
    finally:
        Trainer.run_one_epoch = original
        write_resources(run_dir)


if __name__ == "__main__":
    timed_training(sys.argv[1], sys.argv[2:])
