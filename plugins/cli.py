"""``equirelax``: generated data and a small pretrained potential, for trying relaxation without downloads.

    equirelax data emt OUT.xyz [--n 100] [--seed 0]
    equirelax data emt-field OUT.xyz [--n 100] [--seed 0] [--field 0 0 0.3]
    equirelax pretrain --host mace --out DIR [--n 80] [--epochs 40] [--seed 3]

``pretrain`` generates the symmetric EMT set in DIR, trains a small MACE on it
with MACE's own training (no relaxation) and saves ``DIR/pretrained.model``:
a file to fine-tune with ``--foundation_model``, like any potential a user has.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .data import write_emt_dataset

PRETRAIN_MACE = {
    "name": "pretrained", "valid_fraction": 0.2, "E0s": "average", "model": "MACE", "hidden_irreps": "16x0e + 16x1o",
    "r_max": 4.5, "num_radial_basis": 6, "num_cutoff_basis": 4, "max_L": 1, "correlation": 2, "num_interactions": 2,
    "batch_size": 8, "valid_batch_size": 8, "device": "cpu", "default_dtype": "float64", "eval_interval": 1,
    "energy_weight": 1.0, "forces_weight": 100.0, "lr": 0.01,
}


def pretrain_mace(out: Path, n: int, epochs: int, seed: int) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    write_emt_dataset(out / "sym.xyz", n, seed=seed)
    config = {**PRETRAIN_MACE, "seed": seed, "train_file": "sym.xyz", "max_num_epochs": epochs}
    (out / "pretrain.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "equirelax.plugins.mace", "--config", "pretrain.yaml"], cwd=out)
    if result.returncode:
        sys.exit(f"equirelax: MACE pretraining failed (exit {result.returncode}); see {out / 'logs'}")
    return out / "pretrained.model"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="equirelax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write generated EMT data as extxyz")
    data.add_argument("kind", choices=["emt", "emt-field"])
    data.add_argument("out", type=Path)
    data.add_argument("--n", type=int, default=100)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--field", type=float, nargs=3, default=[0.0, 0.0, 0.3], metavar=("FX", "FY", "FZ"),
                      help="uniform field in eV/Å per unit charge (emt-field only)")
    pre = sub.add_parser("pretrain", help="train and save a small pretrained potential on symmetric EMT data")
    pre.add_argument("--host", choices=["mace"], default="mace")
    pre.add_argument("--out", type=Path, required=True)
    pre.add_argument("--n", type=int, default=80)
    pre.add_argument("--epochs", type=int, default=40)
    pre.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "data":
        if args.n < 1:
            parser.error("--n must be a positive number of configurations")
        write_emt_dataset(args.out, args.n, seed=args.seed, field=args.field if args.kind == "emt-field" else None)
        print(f"wrote {args.n} configurations to {args.out}")
    else:
        if not _has_mace():
            sys.exit("equirelax: pretrain --host mace needs mace-torch: pip install 'equirelax[mace]'")
        path = pretrain_mace(args.out, args.n, args.epochs, args.seed)
        print(f"pretrained MACE saved to {path}")


def _has_mace() -> bool:
    import importlib.util

    return importlib.util.find_spec("mace") is not None


if __name__ == "__main__":
    main()
