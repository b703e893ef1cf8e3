"""A third host that exists only here: a tiny e3nn pair potential trained by a tiny loop, behind the host interface.

Its config is a YAML mapping ``{train_file, test_file, epochs, lr, seed, relax: {...}}``; each run trains in its own
process (``train(run_dir)``) and writes ``model.pt``, ``log.jsonl`` (per epoch: validation force MAE, γ and the
symmetry breaking per layer), plus the ``epochs.json``/``resources.json`` records compare reads.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

import equirelax
from equirelax.core._e3nn import o3
from equirelax.core.hosts import (
    EpochTimer,
    Host,
    HostConfigError,
    absolute_if_file,
    empty_curves,
    layer_curves,
    load_yaml_config,
    write_resources,
)

HERE = Path(__file__).resolve().parent


class ToyPotential(nn.Module):
    """E = Σ_i w·[scalars, |vectors|²] of Linear(Σ_j e^{-r_ij} (1, r̂_ij)): rotation invariant; its forces equivariant."""

    def __init__(self):
        super().__init__()
        self.linear = o3.Linear("1x0e+1x1o", "4x0e+2x1o")
        self.readout = nn.Linear(6, 1)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        difference = positions[:, None, :] - positions[None, :, :]
        distance = (difference.pow(2).sum(-1) + torch.eye(len(positions), dtype=positions.dtype)).sqrt()
        weight = torch.exp(-distance) * (1 - torch.eye(len(positions), dtype=positions.dtype))
        features = torch.cat([weight.sum(1, keepdim=True), (weight[..., None] * difference / distance[..., None])
                              .sum(1)], dim=-1)
        hidden = self.linear(features)
        invariants = torch.cat([hidden[:, :4], hidden[:, 4:].reshape(-1, 2, 3).pow(2).sum(-1)], dim=-1)
        return self.readout(invariants).sum()


def energy_and_forces(model, positions, create_graph=False):
    positions = torch.as_tensor(positions, dtype=torch.float64).clone().requires_grad_(True)
    energy = model(positions)
    (gradient,) = torch.autograd.grad(energy, positions, create_graph=create_graph)
    return energy, -gradient


def _frames(path):
    from ase.io import read

    return [(a.get_positions(), a.info["REF_energy"], a.arrays["REF_forces"]) for a in read(str(path), ":")]


def train(run_dir: str) -> None:
    """One run, in its own process: the config written by ``ToyHost.command``."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    timer = EpochTimer(str(run_dir / "epochs.json"))
    torch.manual_seed(config["seed"])
    torch.set_default_dtype(torch.float64)
    frames = _frames(config["train_file"])
    train_frames, valid_frames = frames[:-4], frames[-4:]
    model = ToyPotential()
    handle = None
    batches = [train_frames[i:i + 4] for i in range(0, len(train_frames), 4)]
    if config.get("relax"):
        relax = config["relax"]
        handle = equirelax.relax(model, relax["controller"], total_steps=config["epochs"] * len(batches),
                                 **relax.get("options", {}))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    if handle is not None:
        optimizer = handle.wrap(optimizer)
    with open(run_dir / "log.jsonl", "w", encoding="utf-8") as log:
        for epoch in range(config["epochs"]):
            timer.start()
            for batch in batches:
                optimizer.zero_grad()
                loss = 0.0
                for positions, energy, forces in batch:
                    predicted_energy, predicted_forces = energy_and_forces(model, positions, create_graph=True)
                    loss = loss + ((predicted_energy - energy) / len(positions)) ** 2 \
                        + (predicted_forces - torch.as_tensor(forces)).pow(2).mean()
                loss.backward()
                optimizer.step()
            timer.stop()
            if handle is not None:
                handle.epoch_end()
            errors = [(energy_and_forces(model, p)[1] - torch.as_tensor(f)).abs().mean().item()
                      for p, _, f in valid_frames]
            row = {"epoch": epoch + 1, "val_force_mae": 1000 * sum(errors) / len(errors)}
            if handle is not None:
                row.update({f"equirelax/{k}": v for k, v in handle.metrics().items()})
            log.write(json.dumps(row) + "\n")
    torch.save(model, run_dir / "model.pt")
    write_resources(str(run_dir))


class ToyHost(Host):
    name = "toy"
    package = None
    config_help = "a toy YAML config"

    def __init__(self, config_path, options):
        config = load_yaml_config(Path(config_path))
        for key in ("train_file", "test_file"):
            if key in config:
                config[key] = absolute_if_file(config[key], Path.cwd())
        if not Path(str(config.get("train_file"))).is_file():
            raise HostConfigError(f"equirelax: the toy config needs a train_file, got {config.get('train_file')!r}")
        self.relax_settings = config.pop("relax", None) or {}
        if options.epochs is not None:
            config["epochs"] = options.epochs
        if options.seed is not None:
            config["seed"] = options.seed
        self.config = config
        self.epochs = config["epochs"]
        self.test_file = options.test_file or config.get("test_file")
        self.energy_key, self.forces_key = "REF_energy", "REF_forces"

    def check(self, controller, options):
        from equirelax.core.controllers import get_controller

        get_controller(controller, **{**self.relax_settings.get("options", {}), **options})

    def command(self, run):
        config = dict(self.config)
        if run.relaxed:
            config["relax"] = {"controller": run.controller,
                               "options": {**self.relax_settings.get("options", {}), **run.options}}
        (run.directory / "config.json").write_text(json.dumps(config))
        script = f"import sys; sys.path.insert(0, {str(HERE)!r}); import toy_host; toy_host.train({str(run.directory)!r})"
        return [sys.executable, "-c", script]

    def curves(self, run):
        curves = empty_curves()
        for line in (run.directory / "log.jsonl").read_text().splitlines():
            row = json.loads(line)
            curves["epoch"].append(row["epoch"])
            curves["val_force_mae"].append(row["val_force_mae"])
            layer_curves(curves, row, row["epoch"])
        return curves

    def models(self, run):
        model = torch.load(run.directory / "model.pt", weights_only=False)
        run.model_epoch = self.epochs
        if not run.relaxed:
            return model, None
        return equirelax.export(copy.deepcopy(model), mode="merge"), model

    def predict(self, model, frames):
        energies, forces, energy_errors, force_errors = [], [], [], []
        rotation = o3.angles_to_matrix(*torch.tensor([0.3, 1.1, -0.7], dtype=torch.float64))
        for atoms in frames:
            positions = torch.as_tensor(atoms.get_positions())
            energy, force = energy_and_forces(model, positions)
            energies.append(energy.item())
            forces.append(force.detach().numpy())
            rotated_energy, rotated_force = energy_and_forces(model, positions @ rotation.T)
            energy_errors.append(abs((rotated_energy - energy) / energy).item())
            force_errors.append(((rotated_force - force @ rotation.T).norm() / force.norm()).item())
        return energies, forces, {"energy": max(energy_errors), "forces": max(force_errors)}
