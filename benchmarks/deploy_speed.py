"""Inference time of a deployed relaxed MACE model (``export(mode="freeze")``, compiled as MACE compiles) vs the
compiled vanilla model of the same size: what MACECalculator and LAMMPS run.

    .venv-mace/bin/python benchmarks/deploy_speed.py [--hidden "64x0e + 64x1o"] [--max-ell 2] [--repeats 7]

Energy and forces (autograd) of a batch of clusters through each TorchScript
model. The relaxed model has every default target relaxed (γ = 1, small random
branches) with each branch kind. Variants are timed interleaved; medians of
repeats, float64.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch

import mace  # noqa: F401
import equirelax
from _timing import seconds_per_step  # benchmarks/ is on sys.path when run as a script
from mace_speed import build, make_batch


def compiled(model):
    from e3nn.util import jit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jit.compile(copy.deepcopy(model).eval())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="64x0e + 64x1o")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    base, table = build(args.hidden)
    batch = make_batch(table, args.clusters)
    variants = {"vanilla (compiled)": compiled(base)}
    for branch in ("linear", "lowrank", "mlp"):
        model = copy.deepcopy(base)
        equirelax.relax(model, "fixed", branch=branch, init="random", init_std=1e-2)
        variants[f"relaxed, {branch} branch (frozen, compiled)"] = compiled(equirelax.export(model, "freeze"))

    def infer(model):
        return model(batch, training=False, compute_force=True)["forces"]

    reference = infer(variants["vanilla (compiled)"])
    times = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, model in variants.items():
            times[label].append(seconds_per_step(lambda m=model: infer(m), args.steps, lambda: None))
    n_atoms = batch["positions"].shape[0]
    print(f"# MACE ({args.hidden}, 2 interactions, correlation 3), default targets, batch of {args.clusters} "
          f"clusters ({n_atoms} atoms), energy + forces, float64, {args.threads} threads, median of {args.repeats} "
          f"repeats of {args.steps} calls, variants interleaved\n")
    print("| model | inference (ms) | / compiled vanilla | max force change vs vanilla (eV/Å) |")
    print("|---|---|---|---|")
    t0 = statistics.median(times["vanilla (compiled)"])
    for label, model in variants.items():
        t = statistics.median(times[label])
        change = float((infer(model) - reference).abs().max())
        print(f"| {label} | {1000 * t:.1f} | {t / t0:.3f} | {change:.2e} |")


if __name__ == "__main__":
    main()
