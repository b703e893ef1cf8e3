"""Each controller's own per-step cost: the time of its hooks (after backward, and after the optimizer step),
timed alone on every training step, next to the whole step.

    .venv-nequip/bin/python benchmarks/hook_time.py [--controllers cr ace-resilient] [--branch lowrank] [--steps 25]
    .venv-mace/bin/python benchmarks/hook_time.py --host mace

The models and batches are ``nequip_speed.py``'s (4 layers, 8 relaxed linears) or ``mace_speed.py``'s (4 relaxed
linears); every controller at its defaults, the first 5 steps not timed, means over the rest (RECM's hooks
differ between its probing steps, every 4th, and the others). The hooks include
what the handle does around the controller (the finiteness check of the gradients). To time another version of
equirelax, put its package first on ``PYTHONPATH`` and run this file from outside the repository.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import equirelax
from _timing import CONTROLLERS, TIMING_BUDGET, training_step  # benchmarks/ is on sys.path when run as a script
from equirelax.core.handle import RelaxHandle

HOOKS = ("after_backward", "after_step")


def time_hooks(times: dict):
    """Time every call of the handle's hooks into ``times[hook]``."""
    for hook in HOOKS:
        def timed(self, *args, _call=getattr(RelaxHandle, hook), _hook=hook, **kwargs):
            start = time.perf_counter()
            result = _call(self, *args, **kwargs)
            times[_hook].append(time.perf_counter() - start)
            return result
        setattr(RelaxHandle, hook, timed)


def host_model(host: str):
    """(model, loss of a model, adapter) of the host's speed benchmark."""
    if host == "mace":
        import mace_speed

        torch.set_default_dtype(torch.float64)
        model, table = mace_speed.build("64x0e + 64x1o")
        return model, mace_speed.train_loss(mace_speed.make_batch(table)), "mace"
    import nequip_speed

    return nequip_speed.build(32, 2, 4, "float64"), nequip_speed.train_loss(nequip_speed.make_batch()), "nequip"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="nequip", choices=["nequip", "mace"])
    parser.add_argument("--controllers", nargs="+", default=["fixed", "cr", "ace", "ace-resilient", "recm"],
                        choices=[label for label, controller, _ in CONTROLLERS if controller])
    parser.add_argument("--branch", default="lowrank", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = {hook: [] for hook in HOOKS}
    time_hooks(times)
    options = {label: (controller, defaults) for label, controller, defaults in CONTROLLERS if controller}
    print(f"# equirelax from {equirelax.__file__}: {args.host}, {args.branch} branch, means of "
          f"{args.steps - 5} steps (ms)\n")
    print("| controller | after backward | after the optimizer step | hooks | step | hooks / step |")
    print("|---|---|---|---|---|---|")
    for label in args.controllers:
        model, loss, adapter = host_model(args.host)
        controller, defaults = options[label]
        handle = equirelax.relax(model, controller, branch=args.branch, adapter=adapter, total_steps=TIMING_BUDGET,
                                 **defaults)
        step = training_step(model, handle, loss)
        step_times = []
        for hook in HOOKS:
            times[hook].clear()
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
        hooks = {hook: statistics.mean(times[hook][5:]) * 1e3 for hook in HOOKS}
        both, whole = sum(hooks.values()), statistics.mean(step_times[5:]) * 1e3
        print(f"| {label} | {hooks['after_backward']:.2f} | {hooks['after_step']:.2f} | {both:.2f} | {whole:.1f} | "
              f"{both / whole:.1%} |", flush=True)


if __name__ == "__main__":
    main()
