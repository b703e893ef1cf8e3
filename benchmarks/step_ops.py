"""Operator calls per MACE training step, by controller: what a launch-bound GPU step pays for.

    .venv-mace/bin/python benchmarks/step_ops.py [--branch lowrank] [--steps 8] [--controllers fixed recm]

On a GPU a small model's step is bound by kernel launches and Python, not arithmetic, so a
controller's cost there follows the number of operators it adds (BENCHMARKS.md, "Training-step
time on a GPU"). This counts them on the CPU, where the count is the same: leaf ``aten::`` calls
(no sub-calls; views included, as each is a dispatch) per step under torch.profiler, split into
the relaxed layers' forwards, the controller's hooks, and the rest (the host's forward, backward
and Adam); and the ops among them that compute (no view, allocation or composite: on a GPU each is
one kernel launch). Same model and batch as ``mace_speed.py``; every controller at its defaults. Where a
model's counted steps differ (RECM's probing steps), its lightest and heaviest step's computing ops are
printed by phase below the table.
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


# ops that launch no kernel of their own: views, allocations, metadata, and composites whose work (if any) is a
# computing op below them
NO_KERNEL = {f"aten::{name}" for name in (
    "as_strided view _unsafe_view _reshape_alias reshape flatten unflatten view_as expand expand_as t numpy_T mT "
    "transpose permute movedim slice select narrow diagonal unsqueeze squeeze unbind split split_with_sizes chunk "
    "alias detach lift_fresh empty empty_like empty_strided new_empty resolve_conj resolve_neg result_type to "
    "_to_copy contiguous clone stack zeros zeros_like new_zeros full full_like new_full ones_like linear einsum "
    "matmul tensordot sum_to_size set_ as_strided_ squeeze_ unsqueeze_").split()}


def _launches(event) -> bool:
    """Whether ``event`` is a computing op with no computing op below it: one kernel launch on a GPU."""
    return (event.name.startswith("aten::") and event.name not in NO_KERNEL
            and not any(_computes_below(child) for child in event.cpu_children))


def _computes_below(event) -> bool:
    return _launches(event) or any(_computes_below(child) for child in event.cpu_children)


def _phase(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("phase:"):
        parent = parent.cpu_parent
    return parent.name[len("phase:"):] if parent else "host"


def count_ops(step) -> tuple[collections.Counter, collections.Counter]:
    """Leaf aten calls of one ``step()``, and its ops that compute (``_launches``: on a GPU, the kernel launches
    of the step), each by the phase range around them ("host" outside every range)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts, launches = collections.Counter(), collections.Counter()
    for event in prof.events():
        if _launches(event):
            launches[_phase(event)] += 1
        if event.name.startswith("aten::") and not event.cpu_children:
            counts[_phase(event)] += 1
    return counts, launches


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
    print("| model | per step | / vanilla | / fixed | relaxed layers' forwards | after_backward | after_step | host "
          "| computing ops (kernels) | / fixed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    means, kernel_means, uneven = {}, {}, {}
    for label, (model, handle) in variants.items():
        step = training_step(model, handle, mace_speed.train_loss(batch))
        for _ in range(6):
            step()
        counted = [count_ops(step) for _ in range(args.steps)]
        steps = [counts for counts, _ in counted]
        totals = [sum(c.values()) for c in steps]
        mean = means[label] = sum(totals) / len(totals)
        kernels = kernel_means[label] = sum(sum(launches.values()) for _, launches in counted) / len(counted)
        over_fixed = f"{mean / means['fixed']:.3f}" if "fixed" in means else "-"
        kernels_over_fixed = f"{kernels / kernel_means['fixed']:.3f}" if "fixed" in kernel_means else "-"
        parts = [sum(c[phase] for c in steps) / len(steps)
                 for phase in ("layers", "after_backward", "after_step", "host")]
        print(f"| {label} | {mean:.0f} ({min(totals)} / {max(totals)}) | {mean / means['vanilla']:.3f} | {over_fixed} | "
              + " | ".join(f"{p:.0f}" for p in parts) + f" | {kernels:.0f} | {kernels_over_fixed} |")
        if min(totals) != max(totals):  # steps that differ (RECM's probing ones): their computing ops by phase
            uneven[label] = [counted[totals.index(min(totals))], counted[totals.index(max(totals))]]
    for label, (light, heavy) in uneven.items():
        print(f"\n{label}, computing ops of its lightest / heaviest counted step by phase: "
              + ", ".join(f"{phase} {light[1][phase]} / {heavy[1][phase]}"
                          for phase in ("layers", "after_backward", "after_step", "host"))
              + f"; in all {sum(light[1].values())} / {sum(heavy[1].values())}")

if __name__ == "__main__":
    main()
