"""Relax a pretrained MACE on external-field data vs vanilla MACE fine-tuning, same data, seed and budget.

    .venv-mace/bin/python benchmarks/mace_finetune.py [--seeds 3 4 5] [--epochs 15] [--workdir DIR]
        [--branches linear lowrank] [--controllers fixed ace-resilient recm] [--lora]
        [--controller-options '{"recm": {"allowance": "rows"}}']

1. generates EMT Cu/Al clusters (equirelax.datasets.emt): a symmetric set and a
   set in a uniform field F = (0, 0, 0.3) eV/Å on neutralised species charges;
2. pretrains a small MACE on the symmetric set with MACE's own CLI (no relax);
3. fine-tunes it on the field set with ``--foundation_model`` for each of
   vanilla / fixed / ace-resilient / recm through ``equirelax-mace-train``, each relaxed run
   with every branch kind of ``--branches``, and (``--lora``) MACE's own LoRA fine-tuning;
4. prints MACE's own test-set force MAE and RMSE of every run, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

CLI = str(Path(sys.executable).parent / "equirelax-mace-train")
RUNS = [("vanilla", None), ("fixed", {"controller": "fixed"}), ("ace-resilient", {"controller": "ace-resilient"}),
        ("recm", {"controller": "recm"})]
BASE = {
    "valid_fraction": 0.2, "model": "MACE", "hidden_irreps": "16x0e + 16x1o", "r_max": 4.5, "num_radial_basis": 6,
    "num_cutoff_basis": 4, "max_L": 1, "correlation": 2, "num_interactions": 2, "batch_size": 8,
    "valid_batch_size": 8, "device": "cpu", "default_dtype": "float64", "eval_interval": 1, "energy_weight": 1.0,
    "forces_weight": 100.0, "error_table": "PerAtomMAE",
}


def run(workdir: Path, config: dict) -> tuple[subprocess.CompletedProcess, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    result = subprocess.run([CLI, "--config", "config.yaml"], cwd=workdir, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{workdir.name} failed:\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - start


def test_errors(workdir: Path) -> tuple[float, float]:
    """Force MAE and RMSE (meV/Å) from MACE's own TEST error table."""
    log = next(p for p in (workdir / "logs").glob("*.log") if not p.name.endswith("_debug.log")).read_text()
    table = log.split("Error-table on TEST")[-1]
    row = next(line for line in table.splitlines() if "Default_Default" in line)
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
    # PerAtomMAE columns: MAE E / meV / atom, MAE F / meV / A, relative F MAE %
    return numbers[1], numbers[2] if len(numbers) > 2 else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--branches", nargs="+", default=["linear"], choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--controllers", nargs="+", default=[name for name, relax in RUNS if relax])
    parser.add_argument("--lora", action="store_true", help="add MACE's own --lora fine-tuning as a row")
    parser.add_argument("--controller-options", type=json.loads, default={},
                        help='per controller, e.g. \'{"recm": {"allowance": "rows"}}\'')
    args = parser.parse_args()
    runs = [("vanilla", None)] + ([("lora", "lora")] if args.lora else [])
    for branch in args.branches:
        suffix = "" if args.branches == ["linear"] else f" ({branch})"
        runs += [(f"{c}{suffix}", {"controller": c, "branch": branch}
                  | ({"options": args.controller_options[c]} if c in args.controller_options else {}))
                 for c in args.controllers]
    from equirelax.datasets.emt import write_emt_dataset

    root = args.workdir or Path(tempfile.mkdtemp(prefix="mace-finetune-"))
    root.mkdir(parents=True, exist_ok=True)
    field = [0.0, 0.0, 0.3]
    write_emt_dataset(root / "sym.xyz", 80, seed=0)
    write_emt_dataset(root / "field_train.xyz", 40, seed=1, field=field)
    write_emt_dataset(root / "field_test.xyz", 20, seed=2, field=field)
    mae = {name: [] for name, _ in runs}
    seconds = {name: [] for name, _ in runs}
    for seed in args.seeds:
        pre = root / f"pretrain-{seed}"
        run(pre, {**BASE, "name": "pre", "seed": seed, "E0s": "average", "lr": 0.01,
                  "train_file": str(root / "sym.xyz"), "max_num_epochs": args.pretrain_epochs})
        # (the earlier, shorter pretraining of `equirelax pretrain --host mace`, on a fixed symmetric set shared by
        # all seeds: the benchmark's published numbers are from it)
        for name, relax in runs:
            directory = root / f"{name.replace(' ', '').replace('(', '-').replace(')', '')}-{seed}"
            config = {**BASE, "name": name, "seed": seed, "lr": 0.005, "max_num_epochs": args.epochs,
                      "train_file": str(root / "field_train.xyz"), "test_file": str(root / "field_test.xyz"),
                      "foundation_model": str(pre / "pre.model"), "multiheads_finetuning": False, "E0s": "foundation"}
            if relax == "lora":
                config["lora"] = True
            elif relax:
                config["relax"] = relax
            _, elapsed = run(directory, config)
            mae[name].append(test_errors(directory)[0])
            seconds[name].append(elapsed)
            print(f"seed {seed} {name}: test force MAE {mae[name][-1]:.1f} meV/Å ({elapsed:.0f} s)", flush=True)
    print(f"\n# MACE fine-tuning on field data: {args.epochs} epochs, seeds {args.seeds}, workdir {root}\n")
    print("| fine-tuning | test force MAE (meV/Å) | vs vanilla | per seed | wall time per run (s) |")
    print("|---|---|---|---|---|")
    vanilla = statistics.mean(mae["vanilla"])
    for name, _ in runs:
        values = mae[name]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.1f} ± {std:.1f} | {statistics.mean(values) / vanilla:.3f} | "
              f"{'/'.join(f'{v:.1f}' for v in values)} | {statistics.median(seconds[name]):.0f} |")


if __name__ == "__main__":
    main()
