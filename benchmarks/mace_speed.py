"""MACE training-step time, relaxed vs vanilla (same model, same batch, one run), and exported-model inference.

    .venv-mace/bin/python benchmarks/mace_speed.py [--hidden "64x0e + 64x1o"] [--repeats 5] [--steps 10]
                                                   [--device cuda] [--dtype float32]
        [--controllers fixed recm] [--controller-options '{"recm": {"allowance": "rows"}}']

A training step is MACE's own: forward with forces (training=True, so the force
graph is kept), energy + force loss, backward, Adam step. Variants are timed
interleaved; medians of repeats. Inference compares the exported (merged)
model of each controller with the vanilla model of the same size.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import mace  # noqa: F401
import equirelax
from _timing import (TIMING_BUDGET, add_controllers_option, device_sync, print_table, relaxed_variants,
                     time_variants)  # benchmarks/ is on sys.path when run as a script


def build(hidden: str):
    from e3nn import o3
    from mace import modules, tools

    table = tools.AtomicNumberTable([13, 29])
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=4.5, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("16x0e"),
        gate=torch.nn.functional.silu, atomic_energies=np.zeros(2), avg_num_neighbors=8, atomic_numbers=table.zs,
        correlation=3, radial_type="bessel", atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    return model, table


def make_batch(table, n=8):
    from equirelax.adapters.mace import mace_batch
    from equirelax.datasets.emt import emt_configurations

    return mace_batch(emt_configurations(n, seed=0, field=[0.0, 0.0, 0.3]), table, cutoff=4.5)


def train_loss(batch):
    """The benchmark's training loss of a model on ``batch``: energy and force MSE, forces by autograd."""
    def loss(model):
        out = model(batch, training=True, compute_force=True)
        return ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="64x0e + 64x1o")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--branch", default="linear", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--rank", type=int, default=None, help="rank of a lowrank branch (default 8)")
    add_controllers_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    base, table = build(args.hidden)
    base.to(args.device)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_batch(table).items()}
    variants = relaxed_variants(base, lambda model, controller, options: equirelax.relax(
        model, controller, branch=args.branch, rank=args.rank, total_steps=TIMING_BUDGET, **options), args.controllers,
        extra=args.controller_options)

    sync = device_sync(args.device)
    train, infer = time_variants(variants, train_loss(batch),
                                 lambda model: model(batch, training=False, compute_force=True),
                                 args.repeats, args.steps, sync)
    n_atoms = batch["positions"].shape[0]
    print(f"# MACE ({args.hidden}, 2 interactions, correlation 3), {args.branch} branch"
          f"{'' if args.rank is None else f' (rank {args.rank})'}, batch of 8 clusters ({n_atoms} atoms), {args.dtype}, "
          f"{args.device}, {args.threads} threads, median of {args.repeats} repeats of {args.steps} steps, variants interleaved\n")
    print_table(train, infer)


if __name__ == "__main__":
    main()
