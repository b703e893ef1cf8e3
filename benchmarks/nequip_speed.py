"""NequIP training-step time, relaxed vs vanilla (same model, same batch, one run), and exported-model inference.

    .venv-nequip/bin/python benchmarks/nequip_speed.py [--features 32] [--l-max 2] [--layers 4] [--repeats 5]
        [--controllers fixed recm] [--controller-options '{"recm": {"allowance": "rows"}}']

A training step is what NequIP's Lightning module does per batch: forward
through ``GraphModel`` (forces by autograd), energy + force MSE, backward, Adam
step; the controller runs from the optimizer's step hooks, as the Lightning
callback runs it. Variants are timed interleaved; medians of repeats.
"""

from __future__ import annotations

import argparse

import torch

import equirelax
from _timing import (TIMING_BUDGET, add_controllers_option, device_sync, print_table, relaxed_variants,
                     time_variants)  # benchmarks/ is on sys.path when run as a script

TYPE_NAMES = ["Al", "Cu"]


def build(features: int, l_max: int, layers: int, dtype: str):
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    return NequIPGNNModel(seed=0, model_dtype=dtype, type_names=TYPE_NAMES, r_max=4.5, l_max=l_max, parity=True,
                          num_layers=layers, num_features=features, radial_mlp_depth=2, radial_mlp_width=64,
                          avg_num_neighbors=10.0)


def make_batch(n=8):
    from equirelax.adapters.nequip import nequip_batch
    from equirelax.datasets.emt import emt_configurations

    return nequip_batch(emt_configurations(n, seed=0, field=[0.0, 0.0, 0.3]), TYPE_NAMES, 4.5)


def train_loss(batch):
    """The benchmark's training loss of a model on ``batch``: energy and force MSE."""
    def loss(model):
        out = model(dict(batch))
        return ((out["total_energy"] - batch["total_energy"]) ** 2).mean() \
            + ((out["forces"] - batch["forces"]) ** 2).mean()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--l-max", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--branch", default="linear", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--rank", type=int, default=None, help="rank of a lowrank branch (default 8)")
    add_controllers_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build(args.features, args.l_max, args.layers, args.dtype).to(args.device)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_batch().items()}
    variants = relaxed_variants(base, lambda model, controller, options: equirelax.relax(
        model, controller, branch=args.branch, rank=args.rank, adapter="nequip", total_steps=TIMING_BUDGET,
        **options), args.controllers,
        extra=args.controller_options)
    sync = device_sync(args.device)
    train, infer = time_variants(variants, train_loss(batch), lambda model: model(dict(batch)), args.repeats,
                                 args.steps, sync)
    n_atoms = batch["pos"].shape[0]
    print(f"# NequIP ({args.features} features, l_max {args.l_max}, {args.layers} layers), {args.branch} branch"
          f"{'' if args.rank is None else f' (rank {args.rank})'} on every conv linear_1/linear_2, batch of 8 "
          f"clusters ({n_atoms} atoms), {args.dtype}, {args.device}, {args.threads} threads, median of "
          f"{args.repeats} repeats of {args.steps} steps, variants interleaved\n")
    print_table(train, infer)


if __name__ == "__main__":
    main()
