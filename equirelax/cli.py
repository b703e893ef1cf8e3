"""``equirelax``: generated data and a small pretrained potential, for trying relaxation without downloads.

    equirelax data emt OUT.xyz [--n 100] [--seed 0]
    equirelax data emt-field OUT.xyz [--n 100] [--seed 0] [--field 0 0 0.3]
    equirelax pretrain --host HOST --out DIR [--n N] [--epochs E] [--n-test 100] [--seed 3]   (HOST: mace, nequip)
    equirelax export --host HOST RELAXED.ckpt OUT.ckpt [--mode merge|drop]           (HOST: nequip)
    equirelax compare --host HOST --config CONFIG.yaml [--controllers vanilla cr ace ace-resilient recm]
                      [--out DIR] [--epochs N] [--seed S] [--test-file F] [--controller-options JSON]

``pretrain`` generates a symmetric EMT training set and a held-out test set in
DIR, trains a small potential with the host's own training (no relaxation; the
host reports its errors on the test set) and saves it (N and E default to the
host's: MACE 400 and 100, NequIP 80 and 40): MACE as
``DIR/pretrained.model`` (fine-tune with ``--foundation_model``), NequIP as
``DIR/pretrained.ckpt`` (fine-tune with ``nequip.model.ModelFromCheckpoint``).
``export`` turns a relaxed NequIP checkpoint into a plain one for
``nequip-package`` (MACE and SevenNet runs write their exported model themselves).
``--host`` takes any installed host plugin (``equirelax compare --help`` lists them).
``compare`` trains vanilla and relaxed models with the host's own training on
the same config and writes one report (see ``equirelax compare --help``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from .compare import USAGE as COMPARE_USAGE
from .compare import (DEFAULT_CONTROLLERS, CompareError, compare, compare_seeds, reading, seeds_reading, seeds_table,
                      table)
from .core.hosts import Host, HostConfigError, available_hosts, get_host
from .datasets.emt import write_emt_dataset


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
    hosts = sorted(available_hosts())
    pre = sub.add_parser("pretrain", help="train and save a small pretrained potential on symmetric EMT data")
    pre.add_argument("--host", choices=hosts, required=True)
    pre.add_argument("--out", type=Path, required=True)
    pre.add_argument("--n", type=int, default=None, help="training configurations (default: the host's)")
    pre.add_argument("--epochs", type=int, default=None, help="training epochs (default: the host's)")
    pre.add_argument("--n-test", type=int, default=100, help="held-out configurations the host reports errors on")
    pre.add_argument("--seed", type=int, default=3)
    exp = sub.add_parser("export", help="write a plain host checkpoint from a relaxed one (branches merged/dropped)")
    exp.add_argument("--host", choices=hosts, required=True)
    exp.add_argument("checkpoint", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--mode", choices=["merge", "drop"], default="merge")
    dep = sub.add_parser("deploy", help="write a relaxed checkpoint for deployment: γ and branches kept, compiled "
                                        "the host's way, runs without equirelax")
    dep.add_argument("--host", choices=hosts, required=True)
    dep.add_argument("checkpoint", type=Path)
    dep.add_argument("out", type=Path, nargs="?", help="where to write it (default: the host's usual name)")
    cmp = sub.add_parser("compare", help="vanilla vs relaxed host training on one config, one report",
                         description=COMPARE_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compare_arguments(cmp, hosts)
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            sys.exit(run_compare(args))
        if args.command == "data":
            if args.n < 1:
                parser.error("--n must be a positive number of configurations")
            field = args.field if args.kind == "emt-field" else None
            write_emt_dataset(args.out, args.n, seed=args.seed, field=field)
            print(f"wrote {args.n} configurations to {args.out}")
        elif args.command == "export":
            host = _installed_host(args.host, "export")
            if not host.can_export:
                sys.exit(f"equirelax: export has no {args.host} support ({args.host} runs write their exported "
                         "model themselves)")
            if not args.checkpoint.is_file():
                sys.exit(f"equirelax: no checkpoint at {args.checkpoint}")
            print(host.export(args.checkpoint, args.out, args.mode))
        elif args.command == "deploy":
            host = _installed_host(args.host, "deploy")
            if not args.checkpoint.is_file():
                sys.exit(f"equirelax: no checkpoint at {args.checkpoint}")
            print(host.deploy(args.checkpoint, args.out))
        else:
            host = _installed_host(args.host, "pretrain")
            if host.pretrain.__func__ is Host.pretrain.__func__:
                sys.exit(f"equirelax: pretrain has no {args.host} support")
            n = host.pretrain_defaults["n"] if args.n is None else args.n
            epochs = host.pretrain_defaults["epochs"] if args.epochs is None else args.epochs
            if n < 2 or epochs < 1 or args.n_test < 1:
                parser.error("pretrain needs --n ≥ 2 (some are held out for validation), --epochs ≥ 1, --n-test ≥ 1")
            args.out.mkdir(parents=True, exist_ok=True)
            write_emt_dataset(args.out / "sym.xyz", n, seed=args.seed)
            write_emt_dataset(args.out / "sym_test.xyz", args.n_test, seed=args.seed + 1000)
            path = host.pretrain(args.out, (args.out / "sym.xyz").resolve(), epochs, args.seed,
                                 (args.out / "sym_test.xyz").resolve())
            print(f"pretrained {args.host} potential saved to {path}")
    except (HostConfigError, ValueError, NotImplementedError) as error:
        message = str(error)
        if not message.startswith("equirelax"):
            raise
        sys.exit(message)


def _installed_host(name: str, command: str):
    host = get_host(name)
    if host.package is not None and importlib.util.find_spec(host.package) is None:
        sys.exit(f"equirelax: {command} --host {name} needs {host.package}: "
                 f"pip install 'equirelax[{host.extra or name}]'")
    return host


def add_compare_arguments(parser, hosts) -> None:
    parser.add_argument("--host", choices=hosts, required=True)
    parser.add_argument("--config", type=Path, required=True, help="your host's own training config")
    parser.add_argument("--controllers", nargs="+", default=list(DEFAULT_CONTROLLERS),
                        help="runs to compare: vanilla, controller names and the host's baselines (MACE: lora, "
                             "field-input) (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("compare-output"),
                        help="directory for the runs and the report (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's number of epochs")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the comparison once per seed; the report gives mean ± std and a paired verdict "
                             "against vanilla per seed")
    parser.add_argument("--test-file", default=None, help="test set (default: the config's)")
    parser.add_argument("--controller-options", default="{}",
                        help="JSON: options per controller, e.g. '{\"recm\": {\"probe_every\": 8}}'")
    parser.add_argument("--device", default=None, help="device for the evaluation (default: the config's)")
    parser.add_argument("--quiet", action="store_true", help="host logs only to each run's output.log")


def run_compare(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise CompareError("equirelax: --epochs must be at least 1")
    try:
        options = json.loads(args.controller_options)
    except json.JSONDecodeError as error:
        raise CompareError(f"equirelax: --controller-options is not valid JSON: {error}") from None
    if not isinstance(options, dict):
        raise CompareError("equirelax: --controller-options must be a JSON object {controller: {option: value}}")
    common = dict(epochs=args.epochs, test_file=args.test_file, controller_options=options, device=args.device,
                  quiet=args.quiet)
    if args.seeds is not None:
        results = compare_seeds(args.host, args.config, args.out, args.controllers, seeds=args.seeds,
                                seed=args.seed, **common)
        print()
        print(seeds_table(results))
        print()
        for line in seeds_reading(results):
            print(f"- {line}")
        print(f"\nreport: {Path(args.out).resolve() / 'report.md'} (each seed's own in seed<s>/)")
        return 1 if any(run["status"] != "ok" for r in results["per_seed_results"].values() for run in r["runs"]) \
            else 0
    results = compare(args.host, args.config, args.out, args.controllers, seed=args.seed, **common)
    print()
    print(table(results))
    print()
    for line in reading(results):
        print(f"- {line}")
    out = Path(args.out).resolve()
    print(f"\nreport: {out / 'report.md'} (results.json, validation.png, gamma.png next to it)")
    return 1 if any(run["status"] != "ok" for run in results["runs"]) else 0


if __name__ == "__main__":
    main()
