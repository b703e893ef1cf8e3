"""Operator calls per MACE training step, by controller: what a launch-bound GPU step pays for.

    .venv-mace/bin/python benchmarks/step_ops.py [--branch lowrank] [--steps 8] [--controllers fixed recm]

On a GPU a small model's step is bound by kernel launches and Python, not arithmetic, so a
controller's cost there follows the number of operators it adds (BENCHMARKS.md, "Training-step
time on a GPU"). This counts them on the CPU, where the count is the same: leaf ``aten::`` calls
(no sub-calls; views included, as each is a dispatch) per step under torch.profiler, split into
the relaxed layers' forwards, the controller's hooks, and the rest (the host's forward, backward
and Adam). Same model and batch as ``mace_speed.py``; every controller at its defaults.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import mace_speed  # benchmarks/ is on sys.path when run as a script
import equirelax
from _timing import TIMING_BUDGET, add_controllers_option, relaxed_variants, training_step
from equirelax.core.handle import RelaxHandle
from equirelax.core.layer import RelaxedLayer

PHASES = {(RelaxedLayer, "forward"): "layers", (RelaxHandle, "after_backward"): "after_backward",
          (RelaxHandle, "after_step"): "after_step"}


def label_phases():
    """Each phase's calls inside a profiler range named after it."""
    for (cls, method), phase in PHASES.items():
        def labelled(self, *args, _call=getattr(cls, method), _phase=phase, **kwargs):
            with record_function(f"phase:{_phase}"):
                return _call(self, *args, **kwargs)
        setattr(cls, method, labelled)


def count_ops(step) -> collections.Counter:
    """Leaf aten calls of one ``step()``, by the phase range around them ("host" outside every range)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.cpu_children:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("phase:"):
            parent = parent.cpu_parent
        counts[parent.name[len("phase:"):] if parent else "host"] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branch", default="lowrank", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--steps", type=int, default=8, help="counted steps (after 6 uncounted ones)")
    add_controllers_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float64)
    base, table = mace_speed.build("64x0e + 64x1o")
    batch = mace_speed.make_batch(table)
    variants = relaxed_variants(base, lambda model, controller, options: equirelax.relax(
        model, controller, branch=args.branch, total_steps=TIMING_BUDGET, **options), args.controllers,
        extra=args.controller_options)
    label_phases()
    print(f"# MACE (64x0e + 64x1o), {args.branch} branch, batch of 8 clusters, leaf aten calls per step, "
          f"mean of {args.steps} steps (min / max over them)\n")
    print("| model | per step | / vanilla | / fixed | relaxed layers' forwards | after_backward | after_step | host |")
    print("|---|---|---|---|---|---|---|---|")
    def loss(model):
        out = model(batch, training=True, compute_force=True)
        return ((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()

    means = {}
    for label, (model, handle) in variants.items():
        step = training_step(model, handle, loss)
        for _ in range(6):
            step()
        steps = [count_ops(step) for _ in range(args.steps)]
        totals = [sum(c.values()) for c in steps]
        mean = means[label] = sum(totals) / len(totals)
        over_fixed = f"{mean / means['fixed']:.3f}" if "fixed" in means else "-"
        parts = [sum(c[phase] for c in steps) / len(steps)
                 for phase in ("layers", "after_backward", "after_step", "host")]
        print(f"| {label} | {mean:.0f} ({min(totals)} / {max(totals)}) | {mean / means['vanilla']:.3f} | {over_fixed} | "
              + " | ".join(f"{p:.0f}" for p in parts) + " |")


if __name__ == "__main__":
    main()
