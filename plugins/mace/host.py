"""MACE for the tools: how ``equirelax compare`` trains and evaluates a MACE config, and how ``pretrain`` runs.

Each compare run is ``python -m equirelax.plugins.mace.host RUN_DIR <equirelax-mace-train arguments>``:
``equirelax-mace-train`` with the training pass of each epoch timed (``epochs.json``) and
the peak memory recorded (``resources.json``).
"""

from __future__ import annotations

import copy
import json
import re
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
    pop_relax_section,
    write_resources,
)

# Trained in float32 as MACE's foundation models are (fine-tuning in float64 converts it, as for MACE-MP);
# energy weighted up from MACE's default so that energies, not only forces, are learned within the budget.
PRETRAIN_CONFIG = {
    "name": "pretrained", "valid_fraction": 0.2, "E0s": "average", "model": "MACE", "hidden_irreps": "16x0e + 16x1o",
    "r_max": 4.5, "num_radial_basis": 6, "num_cutoff_basis": 4, "max_L": 1, "correlation": 2, "num_interactions": 2,
    "batch_size": 16, "valid_batch_size": 32, "device": "cpu", "default_dtype": "float32", "eval_interval": 10,
    "energy_weight": 30.0, "forces_weight": 100.0, "lr": 0.01, "error_table": "PerAtomMAE",
}


class MaceHost(Host):
    name = "mace"
    package = "mace"
    extra = "mace"
    config_help = "a MACE YAML config"
    test_file_key = "test_file"
    baselines = {"lora": "MACE's own LoRA fine-tuning (--lora; lora_rank and lora_alpha from the config, else "
                         "MACE's defaults), merged back into the model at save",
                 "field-input": "MACE given the structure's external field as an equivariant input (field_input: "
                                "true; the field read from extxyz info external_field), the model to build when "
                                "the cause of the broken symmetry is known"}
    # 400 clusters for 100 epochs: energy MAE ≈ 15 meV/atom, forces ≈ 4.4% relative MAE on a held-out set
    pretrain_defaults = {"n": 400, "epochs": 100}
    PATH_KEYS = ("train_file", "valid_file", "test_file", "test_dir", "pt_train_file", "pt_valid_file",
                 "foundation_model", "statistics_file", "E0s")
    # outputs stay in the run's own directory; a fresh run never resumes an earlier one
    DROPPED_KEYS = ("work_dir", "model_dir", "log_dir", "checkpoints_dir", "results_dir", "restart_latest")

    def __init__(self, config_path: Path, options):
        config = load_yaml_config(config_path)
        base = Path.cwd()
        for key in self.PATH_KEYS:
            if isinstance(config.get(key), list):
                config[key] = [absolute_if_file(value, base) for value in config[key]]
            elif key in config:
                config[key] = absolute_if_file(config[key], base)
        for key in self.DROPPED_KEYS:
            config.pop(key, None)
        self.relax_settings = pop_relax_section(config, config_path)
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

    def check(self, controller: str, options: dict) -> None:
        from .config import validate_relax_config

        validate_relax_config(self.relax_section(controller, options))

    def check_inputs(self) -> None:
        for key in self.PATH_KEYS:
            values = self.config.get(key)
            for value in values if isinstance(values, list) else [values]:
                if looks_like_file(value) and not Path(value).exists():
                    raise missing_file(key, value)

    def command(self, run) -> list[str]:
        import yaml

        config = copy.deepcopy(self.config)
        config["name"] = run.name
        if run.relaxed:
            config["relax"] = self.relax_section(run.controller, run.options)
        if run.name == "lora":
            config["lora"] = True
        if run.name == "field-input":
            config["field_input"] = True
        (run.directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return [sys.executable, "-m", "equirelax.plugins.mace.host", str(run.directory), "--config", "config.yaml"]

    def curves(self, run) -> dict:
        files = sorted((run.directory / "results").glob("*_train.txt"))
        curves = empty_curves()
        if not files:
            return curves
        for line in files[-1].read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("mode") != "eval" or row.get("head") == "pt_head":  # the user's head, not the pretraining one
                continue
            epoch = 0 if row.get("epoch") is None else int(row["epoch"]) + 1
            curves["epoch"].append(epoch)
            curves["val_force_mae"].append(1000.0 * row["mae_f"] if "mae_f" in row else None)
            layer_curves(curves, row, epoch)
        return curves

    def models(self, run) -> tuple:
        import torch

        def load(path):
            return torch.load(path, map_location=self.device, weights_only=False).eval()

        model_path = run.directory / f"{run.name}.model"
        if not model_path.exists():
            raise HostConfigError(f"the run wrote no model ({model_path.name})")
        # MACE keeps one checkpoint, the best so far: its epoch is the saved model's
        kept = [int(m.group(1)) for p in (run.directory / "checkpoints").glob("*.pt")
                if (m := re.search(r"_epoch-(\d+)", p.name))]
        run.model_epoch = max(kept) + 1 if kept else None
        if not run.relaxed:
            return load(model_path), None
        relaxed_path = run.directory / f"{run.name}_relaxed.model"
        if relaxed_path.exists():  # <name>.model is the exported plain MACE model, as the run wrote it
            return load(model_path), load(relaxed_path)
        from ...core.patching import export  # relax.export: none: export here, as the run would have

        relaxed = load(model_path)
        return export(copy.deepcopy(relaxed), mode="merge"), relaxed

    def predict(self, model, frames):
        import torch
        from mace.tools import AtomicNumberTable

        from ...adapters.mace import mace_batch

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

        from ...adapters.mace import mace_batch, mace_equivariance_error

        batch = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                 for k, v in mace_batch(frames, table, cutoff).items()}
        error = mace_equivariance_error(model, batch, n_rotations=3, generator=torch.Generator().manual_seed(0))
        return {"energy": error["energy"]["max"], "forces": error["forces"]["max"]}

    @classmethod
    def deploy(cls, checkpoint: Path, out: Path | None) -> str:
        """A relaxed ``.model`` (``<name>_relaxed.model``, or ``<name>.model`` of an ``export: none`` run) frozen and
        compiled as MACE compiles: what ``equirelax-mace-train`` writes as ``<name>_relaxed_compiled.model``."""
        import torch

        from ...core.patching import export
        from .training import _compile_to, _ends_relaxed

        model = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if not _ends_relaxed(model):
            raise ValueError(f"equirelax: {checkpoint} has no relaxed layer with γ ≠ 0: it computes as its exported "
                             "model, which MACE compiles itself (<name>_compiled.model)")
        out = out or Path(checkpoint).with_name(Path(checkpoint).stem + "_compiled.model")
        _compile_to(lambda: export(model, "freeze"), out, "the relaxed model", raise_errors=True)
        return (f"wrote {out}: the relaxed model frozen and compiled (γ and branches kept; MACECalculator and "
                f"MACE's LAMMPS converter load it without equirelax)")

    @classmethod
    def pretrain(cls, out: Path, train_file: Path, epochs: int, seed: int, test_file: Path | None = None) -> Path:
        import yaml

        config = {**PRETRAIN_CONFIG, "seed": seed, "train_file": str(train_file), "max_num_epochs": epochs}
        if test_file is not None:
            config["test_file"] = str(test_file)
        (out / "pretrain.yaml").write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "equirelax.plugins.mace", "--config", "pretrain.yaml"],
                                cwd=out)
        if result.returncode:
            sys.exit(f"equirelax: MACE pretraining failed (exit {result.returncode}); see {out / 'logs'}")
        table = _final_error_tables(out / "logs" / f"{PRETRAIN_CONFIG['name']}_run-{seed}.log")
        if table:
            (out / "errors.md").write_text(table + "\n")
            print(f"MACE's error tables of the pretrained potential (also in {out / 'errors.md'}):\n{table}")
        return out / "pretrained.model"


def _final_error_tables(log: Path) -> str:
    """The error tables MACE logged after training (train and valid, then test), titled, without timestamps."""
    if not log.exists():
        return ""
    lines = log.read_text().splitlines()
    final = max((i for i, line in enumerate(lines) if "Computing metrics" in line), default=0)
    tables = []
    for i, line in enumerate(lines[final:], final):
        if "Error-table" in line:
            tables.append(line[line.index("Error-table"):])
            tables.extend(_table_rows(lines[i + 1:]))
    return "\n".join(tables)


def _table_rows(lines):
    for line in lines:
        if not line.startswith(("+", "|")):
            return
        yield line


def timed_training(run_dir: str, argv: list[str]) -> None:
    """``equirelax-mace-train argv`` with each epoch's training pass timed into RUN_DIR/epochs.json."""
    import mace  # noqa: F401
    import mace.tools as tools

    from .training import main

    train_module = sys.modules["mace.tools.train"]
    timer = EpochTimer(str(Path(run_dir) / "epochs.json"))
    original_train = tools.train

    def timed_train(*a, **k):
        inner = train_module.train_one_epoch  # already wrapped by the relax session when there is one

        def train_one_epoch(*a2, **k2):
            timer.start()
            try:
                return inner(*a2, **k2)
            finally:
                timer.stop()

        train_module.train_one_epoch = train_one_epoch
        try:
            return original_train(*a, **k)
        finally:
            train_module.train_one_epoch = inner

    tools.train = timed_train
    try:
        main(argv)
    finally:
        write_resources(run_dir)


if __name__ == "__main__":
    timed_training(sys.argv[1], sys.argv[2:])
