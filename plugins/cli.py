"""``equirelax``: generated data and a small pretrained potential, for trying relaxation without downloads.

    equirelax data emt OUT.xyz [--n 100] [--seed 0]
    equirelax data emt-field OUT.xyz [--n 100] [--seed 0] [--field 0 0 0.3]
    equirelax pretrain --host mace|nequip --out DIR [--n 80] [--epochs 40] [--seed 3]
    equirelax export --host nequip RELAXED.ckpt OUT.ckpt [--mode merge|drop]
    equirelax compare --host mace|nequip --config CONFIG.yaml [--controllers vanilla cr ace ace-resilient recm]
                      [--out DIR] [--epochs N] [--seed S] [--test-file F] [--controller-options JSON]

``pretrain`` generates the symmetric EMT set in DIR, trains a small potential on
it with the host's own training (no relaxation) and saves it: MACE as
``DIR/pretrained.model`` (fine-tune with ``--foundation_model``), NequIP as
``DIR/pretrained.ckpt`` (fine-tune with ``nequip.model.ModelFromCheckpoint``).
``export`` turns a relaxed NequIP checkpoint into a plain one for
``nequip-package`` (MACE runs write their exported model themselves).
``compare`` trains vanilla and relaxed models with the host's own training on
the same config and writes one report (see ``equirelax compare --help``).
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


def pretrain_nequip(out: Path, n: int, epochs: int, seed: int) -> Path:
    import os
    import shutil

    from .nequip_config import training_config, write_config

    out.mkdir(parents=True, exist_ok=True)
    write_emt_dataset(out / "sym.xyz", n, seed=seed)
    config = training_config(str((out / "sym.xyz").resolve()), epochs=epochs, seed=seed, logger_dir=None)
    write_config(out, "pretrain", config)
    train = os.path.join(os.path.dirname(sys.executable), "nequip-train")
    result = subprocess.run([train, "-cp", str(out.resolve()), "-cn", "pretrain",
                             f"hydra.run.dir={(out / 'pretrain_run').resolve()}"], cwd=out)
    if result.returncode:
        sys.exit(f"equirelax: NequIP pretraining failed (exit {result.returncode}); see {out / 'pretrain_run'}")
    shutil.copy(out / "pretrain_run" / "best.ckpt", out / "pretrained.ckpt")
    return out / "pretrained.ckpt"


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
    pre.add_argument("--host", choices=["mace", "nequip"], default="mace")
    pre.add_argument("--out", type=Path, required=True)
    pre.add_argument("--n", type=int, default=80)
    pre.add_argument("--epochs", type=int, default=40)
    pre.add_argument("--seed", type=int, default=3)
    exp = sub.add_parser("export", help="write a plain host checkpoint from a relaxed one (branches merged/dropped)")
    exp.add_argument("--host", choices=["nequip"], default="nequip")
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--mode", choices=["merge", "drop"], default="merge")
    from . import compare

    cmp = sub.add_parser("compare", help="vanilla vs relaxed host training on one config, one report",
                         description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(cmp)
    args = parser.parse_args(argv)
    if args.command == "compare":
        try:
            sys.exit(compare.main(args))
        except compare.CompareError as error:
            sys.exit(str(error))
    if args.command == "data":
        if args.n < 1:
            parser.error("--n must be a positive number of configurations")
        write_emt_dataset(args.out, args.n, seed=args.seed, field=args.field if args.kind == "emt-field" else None)
        print(f"wrote {args.n} configurations to {args.out}")
    elif args.command == "export":
        if not _has("nequip"):
            sys.exit("equirelax: export --host nequip needs nequip: pip install 'equirelax[nequip]'")
        if not args.checkpoint.is_file():
            sys.exit(f"equirelax: no checkpoint at {args.checkpoint}")
        from .nequip import export_checkpoint

        try:
            export_checkpoint(args.checkpoint, args.out, args.mode)
        except ValueError as error:
            sys.exit(str(error))
        print(f"wrote plain NequIP checkpoint ({args.mode}) to {args.out}; package it with "
              f"nequip-package build {args.out} model.nequip.zip")
    else:
        package = {"mace": "mace", "nequip": "nequip"}[args.host]
        if not _has(package):
            sys.exit(f"equirelax: pretrain --host {args.host} needs {package}: pip install 'equirelax[{args.host}]'")
        pretrain = pretrain_mace if args.host == "mace" else pretrain_nequip
        path = pretrain(args.out, args.n, args.epochs, args.seed)
        print(f"pretrained {args.host} potential saved to {path}")


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


if __name__ == "__main__":
    main()
