"""NequIP training-step time, relaxed vs vanilla (same model, same batch, one run), and exported-model inference.

    .venv-nequip/bin/python benchmarks/nequip_speed.py [--features 32] [--l-max 2] [--layers 4] [--repeats 5]

A training step is what NequIP's Lightning module does per batch: forward
through ``GraphModel`` (forces by autograd), energy + force MSE, backward, Adam
step; the controller runs from the optimizer's step hooks, as the Lightning
callback runs it. Variants are timed interleaved; medians of repeats.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import equirelax

CONTROLLERS = [("vanilla", None, {}), ("fixed", "fixed", {}), ("cr", "cr", {"epochs": 10}), ("ace", "ace", {}),
               ("ace-resilient", "ace-resilient", {}), ("recm", "recm", {})]
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
    from equirelax.plugins.data import emt_configurations

    return nequip_batch(emt_configurations(n, seed=0, field=[0.0, 0.0, 0.3]), TYPE_NAMES, 4.5)


def train_time(model, handle, batch, steps):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    if handle:
        handle.wrap(opt)
    model.train()

    def step():
        opt.zero_grad()
        out = model(dict(batch))
        loss = ((out["total_energy"] - batch["total_energy"]) ** 2).mean() \
            + ((out["forces"] - batch["forces"]) ** 2).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def inference_time(model, batch, steps):
    model.eval()
    for _ in range(2):
        model(dict(batch))
    start = time.perf_counter()
    for _ in range(steps):
        model(dict(batch))
    return (time.perf_counter() - start) / steps


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build(args.features, args.l_max, args.layers, args.dtype).to(args.device)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_batch().items()}
    variants = {}
    for label, controller, options in CONTROLLERS:
        model = copy.deepcopy(base)
        variants[label] = (model, equirelax.relax(model, controller, branch=args.branch, rank=args.rank,
                                                  adapter="nequip", **options) if controller else None)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    train = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, (model, handle) in variants.items():
            sync()
            train[label].append(train_time(model, handle, batch, args.steps))
            sync()
    exported = {label: equirelax.export(copy.deepcopy(model)) if handle else copy.deepcopy(model)
                for label, (model, handle) in variants.items()}
    infer = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, model in exported.items():
            infer[label].append(inference_time(model, batch, args.steps))
    n_atoms = batch["pos"].shape[0]
    print(f"# NequIP ({args.features} features, l_max {args.l_max}, {args.layers} layers), {args.branch} branch"
          f"{'' if args.rank is None else f' (rank {args.rank})'} on every conv linear_1/linear_2, batch of 8 "
          f"clusters ({n_atoms} atoms), {args.dtype}, {args.device}, {args.threads} threads, median of "
          f"{args.repeats} repeats of {args.steps} steps, variants interleaved\n")
    print("| model | train step (ms) | relaxed / vanilla | exported inference (ms) | exported / vanilla |")
    print("|---|---|---|---|---|")
    t0, i0 = statistics.median(train["vanilla"]), statistics.median(infer["vanilla"])
    for label in variants:
        t, i = statistics.median(train[label]), statistics.median(infer[label])
        print(f"| {label} | {1000 * t:.1f} | {t / t0:.3f} | {1000 * i:.1f} | {i / i0:.3f} |")


if __name__ == "__main__":
    main()
