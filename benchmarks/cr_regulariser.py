"""CR's own per-step cost on the NequIP speed benchmark's model: its after-backward hook (the regulariser's
value and its gradients on every branch), timed alone, next to the whole training step.

    .venv-nequip/bin/python benchmarks/cr_regulariser.py [--branch lowrank] [--steps 25]

The model, batch and branch are ``nequip_speed.py``'s; the first 5 steps are not timed. To time another
version of equirelax, put its package first on ``PYTHONPATH`` and run this file from outside the repository.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import equirelax
from nequip_speed import build, make_batch  # benchmarks/ is on sys.path when run as a script


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branch", default="lowrank", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build(32, 2, 4, "float64"), make_batch()
    handle = equirelax.relax(model, "cr", branch=args.branch, adapter="nequip", epochs=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    controller, finite = handle.controller, torch.tensor(True)
    hook_times, step_times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        out = model(dict(batch))
        loss = ((out["total_energy"] - batch["total_energy"]) ** 2).mean() \
            + ((out["forces"] - batch["forces"]) ** 2).mean()
        loss.backward()
        hook = time.perf_counter()
        controller.equirelax_after_backward(handle, finite)
        hook_times.append(time.perf_counter() - hook)
        for layer in controller.layers.values():
            layer.cached_inputs.clear()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    hook, step = (statistics.median(t[5:]) * 1e3 for t in (hook_times, step_times))
    print(f"equirelax from {equirelax.__file__}: {args.branch} branch, CR hook {hook:.1f} ms of a {step:.1f} ms "
          f"step ({hook / step:.1%}), medians of {args.steps - 5} steps")


if __name__ == "__main__":
    main()
