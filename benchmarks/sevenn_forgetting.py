"""Forgetting after fine-tuning SevenNet-0: how far each fine-tuned model drifts from the original SevenNet-0 on
held-out symmetric structures it was not fine-tuned on (bulk cells, surfaces, clusters of several elements).

    make sevenn-demo                                             # the fine-tuned runs, in sevenn-output/
    .venv-nequip/bin/python benchmarks/sevenn_forgetting.py [--runs sevenn-output] [--threads 2]

For every run of ``sevenn-output/{field,symmetric}`` (vanilla and each controller) the exported model
(``checkpoint_best.pth``) and the relaxed one (``checkpoint_best_relaxed.pth``) predict the held-out structures;
the table gives the mean |ΔE| per atom and the mean |ΔF| per component against SevenNet-0's own predictions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def held_out_structures(seed: int = 0):
    """Bulk cells, surface slabs and clusters of elements SevenNet-0 knows, slightly rattled (symmetric data:
    no field, nothing the fine-tuning sets held)."""
    from ase.build import bulk, fcc100, fcc111
    from ase.cluster import Icosahedron

    structures = [
        bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2), bulk("Al", "fcc", a=4.05, cubic=True).repeat(2),
        bulk("Ni", "fcc", a=3.52, cubic=True).repeat(2), bulk("Si", "diamond", a=5.43, cubic=True),
        bulk("CuAu", "rocksalt", a=5.2), fcc111("Cu", size=(2, 2, 3), vacuum=6.0), fcc100("Al", size=(2, 2, 3),
                                                                                           vacuum=6.0),
        fcc111("Pt", size=(2, 2, 3), vacuum=6.0), Icosahedron("Au", 2), Icosahedron("Ni", 2),
    ]
    mixed = Icosahedron("Cu", 2)
    mixed.symbols[::3] = "Ag"
    structures.append(mixed)
    rng = np.random.default_rng(seed)
    for atoms in structures:
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return structures


def predictions(model, structures):
    from sevenn.calculator import SevenNetCalculator

    calculator = SevenNetCalculator(model=model, device="cpu")
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calculator
        out.append((atoms.get_potential_energy() / len(atoms), np.array(atoms.get_forces())))
    return out


def drift(ours, reference):
    energy = 1000 * np.mean([abs(a[0] - b[0]) for a, b in zip(ours, reference)])
    forces = 1000 * np.mean(np.concatenate([np.abs(a[1] - b[1]).ravel() for a, b in zip(ours, reference)]))
    return energy, forces


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("sevenn-output"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sevenn.util import model_from_checkpoint, pretrained_name_to_path

    from equirelax.core.settings import validate_relax_settings
    from equirelax.plugins.sevenn.training import RELAX_KEYS, relaxed_model

    structures = held_out_structures()
    original, _ = model_from_checkpoint(pretrained_name_to_path("7net-0"))
    reference = predictions(original.eval(), structures)
    print(f"# drift from SevenNet-0 on {len(structures)} held-out symmetric structures "
          f"({sum(len(a) for a in structures)} atoms: bulk Cu, Al, Ni, Si, CuAu; Cu(111), Al(100), Pt(111) slabs; "
          "Au13, Ni13, CuAg13 icosahedra; rattled 0.05 Å)\n")
    print("| fine-tuned on | run | mean abs ΔE (meV/atom): exported / relaxed | mean abs ΔF (meV/Å): exported / relaxed |")
    print("|---|---|---|---|")
    for kind in ("field", "symmetric"):
        results = json.loads((args.runs / kind / "results.json").read_text())
        for run in results["runs"]:
            directory = Path(run["directory"])
            exported, _ = model_from_checkpoint(str(directory / "checkpoint_best.pth"))
            e_exp, f_exp = drift(predictions(exported.eval(), structures), reference)
            relaxed_text = ("-", "-")
            if run["controller"] is not None and (directory / "checkpoint_best_relaxed.pth").exists():
                settings = validate_relax_settings({"controller": run["controller"]}, keys=RELAX_KEYS)
                relaxed = relaxed_model(directory / "checkpoint_best_relaxed.pth", settings).eval()
                e_rel, f_rel = drift(predictions(relaxed, structures), reference)
                relaxed_text = (f"{e_rel:.1f}", f"{f_rel:.1f}")
            print(f"| {kind} | {run['name']} | {e_exp:.1f} / {relaxed_text[0]} | {f_exp:.1f} / {relaxed_text[1]} |")


if __name__ == "__main__":
    main()
