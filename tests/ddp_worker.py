"""Run by ``torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR``: DDP training (gloo) of a relaxed e3nn model
for each controller and branch, every rank saving its weights and controller state to OUT_DIR/rank<r>.pt.
``train`` with ``world=1`` is the single-process reference on the same global batches."""

import os
import sys

import torch

import equirelax
from equirelax.datasets.synthetic import gated_e3nn_model, make_task

CONTROLLERS = [("fixed", {}), ("cr", {"epochs": 3}), ("ace", {}), ("ace-resilient", {}), ("recm", {}),
               ("recm", {"allowance": "rows"})]
BRANCHES = ("linear", "mlp")
STEPS, EPOCHS, GLOBAL_BATCH = 4, 2, 32


def label(controller, options, branch) -> str:
    return "-".join([controller, *(f"{key}={value}" for key, value in options.items()), branch])


def train(controller, options, branch, rank=0, world=1):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the initial weights depend on it
    try:
        return _train(controller, options, branch, rank, world)
    finally:
        torch.set_default_dtype(previous)


def _train(controller, options, branch, rank, world):
    torch.manual_seed(0)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, controller, branch=branch, init="random", init_std=0.1,
                            total_steps=STEPS * EPOCHS, **options)
    net = model
    if world > 1:
        # RECM's probing steps leave the branches out of the graph: DDP must be told some may be unused
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=controller == "recm")
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
    x, y = make_task("field", GLOBAL_BATCH * STEPS, seed=5, dtype=torch.float64)
    share = GLOBAL_BATCH // world
    for _ in range(EPOCHS):
        for step in range(STEPS):
            rows = slice(step * GLOBAL_BATCH + rank * share, step * GLOBAL_BATCH + (rank + 1) * share)
            optimizer.zero_grad()
            ((net(x[rows]) - y[rows]) ** 2).mean().backward()
            optimizer.step()
        handle.epoch_end()
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "controller": handle.state_dict()}


def main(out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {label(c, o, b): train(c, o, b, rank, world) for c, o in CONTROLLERS for b in BRANCHES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
