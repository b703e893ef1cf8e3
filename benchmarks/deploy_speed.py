"""Inference time of a deployed relaxed model vs the deployed vanilla model of the same size: what
MACECalculator / LAMMPS (MACE) and pair_style e3gnn (SevenNet) run.

    cd benchmarks && ../.venv-mace/bin/python deploy_speed.py --host mace [--hidden "64x0e + 64x1o"] [--repeats 7]
    cd benchmarks && ../.venv-nequip/bin/python deploy_speed.py --host sevenn [--repeats 7]

MACE: ``export(mode="freeze")`` compiled with e3nn's ``jit.compile`` (as
``equirelax-mace-train`` writes ``<name>_relaxed_compiled.model``) vs the vanilla
model compiled the same way; energy and forces of a batch of clusters, float64.
SevenNet: SevenNet-0 deployed by sevenn's own ``deploy`` (``sevenn_get_model``) vs
its relaxed model deployed by ``equirelax deploy --host sevenn``; energy and
forces (dE/d edge_vec, as pair_e3gnn computes them) of a 64-atom bulk cell's
neighbour list, float32. Every default target relaxed, γ = 1, small random
branches, each branch kind. Variants are timed interleaved; medians of repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from _timing import seconds_per_step  # benchmarks/ is on sys.path when run as a script

BRANCHES = ("linear", "lowrank", "mlp")


def mace_variants(args):
    import mace  # noqa: F401
    import equirelax
    from e3nn.util import jit
    from mace_speed import build, make_batch

    torch.set_default_dtype(torch.float64)
    base, table = build(args.hidden)
    batch = make_batch(table, args.clusters)

    def compiled(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return jit.compile(copy.deepcopy(model).eval())

    models = {"vanilla (compiled)": compiled(base)}
    for branch in BRANCHES:
        model = copy.deepcopy(base)
        equirelax.relax(model, "fixed", branch=branch, init="random", init_std=1e-2)
        models[f"relaxed, {branch} branch (frozen, compiled)"] = compiled(equirelax.export(model, "freeze"))
    title = (f"MACE ({args.hidden}, 2 interactions, correlation 3), default targets, batch of {args.clusters} "
             f"clusters ({batch['positions'].shape[0]} atoms), energy + forces, float64")
    return {label: (lambda m=m: m(batch, training=False, compute_force=True)["forces"]) for label, m in
            models.items()}, title


def sevenn_variants(args):
    import equirelax
    from ase.build import bulk
    from sevenn.scripts.deploy import deploy
    from sevenn.util import load_checkpoint, model_from_checkpoint, pretrained_name_to_path

    from equirelax.plugins.sevenn.checkpoint import deploy_relaxed

    directory = Path(tempfile.mkdtemp(prefix="sevenn-deploy-"))
    path = pretrained_name_to_path("7net-0")
    deploy(path, fname=str(directory / "vanilla.pt"))
    files = {"vanilla (sevenn_get_model)": directory / "vanilla.pt"}
    for branch in BRANCHES:
        torch.manual_seed(0)
        model, _ = model_from_checkpoint(path)
        equirelax.relax(model, "fixed", branch=branch, init="random", init_std=1e-2)
        checkpoint = load_checkpoint(path).get_checkpoint_dict()
        checkpoint["model_state_dict"] = model.state_dict()
        torch.save(checkpoint, directory / f"{branch}.pth")
        files[f"relaxed, {branch} branch (equirelax deploy)"] = deploy_relaxed(directory / f"{branch}.pth",
                                                                              directory / f"{branch}.pt")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 4))
    atoms.numbers[::4] = 13
    atoms.rattle(0.05, seed=0)
    positions = torch.tensor(atoms.positions, dtype=torch.float32)
    n = len(atoms)
    calls = {}
    for label, file in files.items():
        extra = {"chemical_symbols_to_index": "", "cutoff": ""}
        model = torch.jit.load(str(file), _extra_files=extra)
        symbols, cutoff = extra["chemical_symbols_to_index"].decode().split(), float(extra["cutoff"].decode())
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        keep = (i != j) & ((positions[j] - positions[i]).norm(dim=-1) < cutoff)
        src, dst = i[keep], j[keep]
        types = torch.tensor([symbols.index(s) for s in atoms.get_chemical_symbols()])

        def call(model=model, src=src, dst=dst, types=types):
            edge_vec = (positions[dst] - positions[src]).requires_grad_(True)
            data = {"x": types, "edge_index": torch.stack([src, dst]), "edge_vec": edge_vec,
                    "num_atoms": torch.tensor([n]), "nlocal": torch.tensor([n])}
            energy = model(data)["inferred_total_energy"].squeeze()
            dE_dr, = torch.autograd.grad(energy, edge_vec)
            return torch.zeros(n, 3).index_add_(0, src, dE_dr).index_add_(0, dst, -dE_dr)

        calls[label] = call
    return calls, f"SevenNet-0 (842k parameters), default targets, {n}-atom fcc Cu/Al cell (no images), float32"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", choices=["mace", "sevenn"], default="mace")
    parser.add_argument("--hidden", default="64x0e + 64x1o")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls, title = (mace_variants if args.host == "mace" else sevenn_variants)(args)
    vanilla = next(iter(calls))
    reference = calls[vanilla]()
    times = {label: [] for label in calls}
    for _ in range(args.repeats):
        for label, call in calls.items():
            times[label].append(seconds_per_step(call, args.steps, lambda: None))
    print(f"# {title}, {args.threads} threads, median of {args.repeats} repeats of {args.steps} calls, variants "
          "interleaved\n")
    print("| model | inference (ms) | / deployed vanilla | max force change vs vanilla (eV/Å) |")
    print("|---|---|---|---|")
    t0 = statistics.median(times[vanilla])
    for label, call in calls.items():
        t = statistics.median(times[label])
        print(f"| {label} | {1000 * t:.1f} | {t / t0:.3f} | {float((call() - reference).abs().max()):.2e} |")


if __name__ == "__main__":
    main()
