"""RECM's probing steps: MACE training-step time of a plain step, a probing step as computed now (projections
through their block scalars, probe maps through their rank) and a probing step with the same formula applied
through dense maps (how it was computed before), in one process, interleaved.

    .venv-mace/bin/python benchmarks/recm_probing.py [--probes 8]

The dense variant is the formula the unit test checks the layer against
(``test_a_recm_probing_step_computes_the_dense_formula``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import mace  # noqa: F401
import equirelax
from equirelax.core.layer import RelaxedLayer
from mace_speed import build, make_batch  # benchmarks/ is on sys.path when run as a script


def dense_probing_forward(self, out, x, recording):
    """f_eq(x) + γ·P(W)x + P⊥(V)x with V = B·A and the projections formed as dense matrices."""
    rows = x.reshape(-1, x.shape[-1])
    V = self.probe_B @ self.probe_A
    off = V - torch.stack([self.equivariant_weight(V[0]), self.equivariant_weight(V[1])])
    first, second = nn.functional.linear(rows, off[0]), nn.functional.linear(rows, off[1])
    half = rows.shape[0] // 2
    correction = torch.cat([first[:half], second[half:]])
    if recording:
        first, second = first.detach(), second.detach()
        self.probe_sums = ((first * second).sum(), (first - second).pow(2).sum() / 2, out.detach().pow(2).sum())
    kept = nn.functional.linear(rows, self.equivariant_weight(self.branch.weight.detach()))
    return out + (correction + self.gamma.detach().to(x.dtype) * kept).reshape(*x.shape[:-1], -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="64x0e + 64x1o")
    parser.add_argument("--probes", type=int, default=8, help="probing steps timed per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    base, table = build(args.hidden)
    batch = make_batch(table)
    model = copy.deepcopy(base)
    handle = equirelax.relax(model, "recm", branch="lowrank", total_steps=100000)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-3))
    layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
    current = RelaxedLayer.probing_forward
    times = {"plain step": [], "probing step": [], "probing step, dense maps": []}
    probes, warmup = 0, 8
    try:
        for step in range(warmup + 8 * args.probes + 8):
            if layer.probing:
                probes += 1
                variant = "probing step, dense maps" if probes % 2 else "probing step"
            else:
                variant = "plain step"
            RelaxedLayer.probing_forward = dense_probing_forward if variant.endswith("dense maps") else current
            start = time.perf_counter()
            optimizer.zero_grad()
            out = model(batch, training=True, compute_force=True)
            loss = ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times[variant].append(time.perf_counter() - start)
    finally:
        RelaxedLayer.probing_forward = current
    plain = statistics.median(times["plain step"])
    print(f"# MACE ({args.hidden}, 2 interactions, correlation 3), RECM at its defaults (probe_every 4), lowrank "
          f"branch, batch of 8 clusters, float64, {args.threads} threads, medians, variants interleaved\n")
    print("| step | time (ms) | / plain step | RECM's mean step / plain (1 probing step in 4) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        mean_step = (3 * plain + median) / 4 / plain if name != "plain step" else 1.0
        print(f"| {name} ({len(values)}) | {1e3 * median:.1f} | {median / plain:.2f} | {mean_step:.3f} |")


if __name__ == "__main__":
    main()
