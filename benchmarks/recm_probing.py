"""RECM's probing steps: MACE training-step time of a plain step, a probing step as computed now (projections
through their block scalars, probe maps through their rank) and a probing step with the same formula applied
through dense maps (how it was computed before), in one process, interleaved.

    .venv-mace/bin/python benchmarks/recm_probing.py [--probes 8]

The dense variant is the layer's own dense path (taken on layers below
``RelaxedLayer.BLOCKWISE_PROBE_ENTRIES`` entries), forced on every layer here.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import mace  # noqa: F401
import equirelax
from equirelax.core.layer import RelaxedLayer
from _timing import TIMING_BUDGET
from mace_speed import build, make_batch, train_loss  # benchmarks/ is on sys.path when run as a script


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
    batch_loss = train_loss(batch)
    model = copy.deepcopy(base)
    handle = equirelax.relax(model, "recm", branch="lowrank", total_steps=TIMING_BUDGET)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=1e-3))
    layer = next(m for m in model.modules() if isinstance(m, RelaxedLayer))
    blockwise_from = RelaxedLayer.BLOCKWISE_PROBE_ENTRIES
    times = {"plain step": [], "probing step": [], "probing step, dense maps": []}
    probes, warmup = 0, 8
    try:
        for step in range(warmup + 8 * args.probes + 8):
            if layer.probing:
                probes += 1
                variant = "probing step, dense maps" if probes % 2 else "probing step"
            else:
                variant = "plain step"
            RelaxedLayer.BLOCKWISE_PROBE_ENTRIES = float("inf") if variant.endswith("dense maps") else blockwise_from
            start = time.perf_counter()
            optimizer.zero_grad()
            batch_loss(model).backward()
            optimizer.step()
            if step >= warmup:
                times[variant].append(time.perf_counter() - start)
    finally:
        RelaxedLayer.BLOCKWISE_PROBE_ENTRIES = blockwise_from
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
