"""RECM's levels against the run's budget, on the README's plain-loop example (field and symmetric data,
512 samples, batch 64, Adam at ``--lr`` (1e-2), default options unless ``--options``), over model-initialisation
seeds.

    .venv-mace/bin/python benchmarks/recm_budget.py [--epochs 20 60] [--seeds 12] [--lr 1e-2] [--options '{"warmup": 0.5}']
        [--kinds field symmetric] [--shuffle] [--measure-only] [--split-by-position] [--fixed]
        [--hold-at-one] [--host-skips-probes]

``--shuffle`` draws the batches in a new order every epoch, as hosts' data loaders do (the README's loop
keeps one order, so each sample always meets the same probe map). ``--measure-only`` sets every level
back to 0 after each of RECM's updates: RECM still measures, but the branch never trains, which separates
what the probe maps read by themselves from a feedback through a branch that has fitted the data.
``--split-by-position`` gives RECM's first probe map the first half of each batch's rows and the second map
the rest, as before the maps were split by sample: over reshuffled epochs each map then meets every sample
(by default each sample's hash sends it to one map, in every epoch). ``--fixed`` also trains each seed with the
unconstrained `fixed` branch and gives RECM's test MSE over it. ``--hold-at-one`` sets every level back to 1
after each of RECM's updates (it still measures and probes): what the probing steps alone cost.
``--host-skips-probes`` drops the model's gradients on probing steps: only the probe maps learn there.

Per budget and data: each layer's end level (median and range over seeds), how many seeds end with some
layer above 0.1, the median share of epochs at whose end every level was 0, and the test MSE (median over
seeds, 1024 fresh samples).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import mace  # noqa: F401  (e3nn 0.4.4 imports under torch >= 2.6 only after mace)
import equirelax
from equirelax import hookimpl
from equirelax.core.samples import remove_sample_split
from equirelax.datasets.synthetic import gated_e3nn_model, make_task

TARGETS = ["0", "2"]


class HoldLevels:
    """Runs after RECM's update and sets every level back to ``level`` (0: ``--measure-only``; 1: ``--hold-at-one``)."""

    def __init__(self, level: float):
        self.level = level

    @hookimpl(trylast=True)
    def equirelax_after_backward(self, handle, finite):
        for layer in handle.layers.values():
            layer.gamma.data.fill_(self.level)


class SkipHostOnProbes:
    """Drops every model parameter's gradient on RECM's probing steps, so the optimizer leaves them as they are."""

    @hookimpl(trylast=True)
    def equirelax_after_backward(self, handle, finite):
        if any(layer.probing for layer in handle.layers.values()):
            for parameter in handle.model.parameters():
                parameter.grad = None


def run(kind: str, epochs: int, seed: int, options: dict, lr: float = 1e-2, shuffle: bool = False,
        hold: float | None = None, split_by_position: bool = False, controller: str = "recm",
        host_skips_probes: bool = False):
    """The README example with ``epochs`` epochs: (end levels, levels after each epoch, test MSE). ``hold``: every
    level is set back to it after each of RECM's updates; at 0 (``--measure-only``) the levels given are the ones
    RECM's gap would set, min(1, gap/τ)."""
    torch.manual_seed(seed)
    model = gated_e3nn_model()
    x, y = make_task(kind, 512)
    handle = equirelax.relax(model, controller=controller, targets=TARGETS, branch="linear",
                             total_steps=epochs * 8, **(options if controller == "recm" else {}))
    if hold is not None:
        handle.plugins.register(HoldLevels(hold))
    if host_skips_probes and controller == "recm":
        handle.plugins.register(SkipHostOnProbes())
    if split_by_position:
        remove_sample_split(model)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=lr))
    order = torch.Generator().manual_seed(seed)
    history = []

    def levels():
        if hold != 0:
            return handle.levels()
        controller = handle.controller
        return {name: min(1.0, float(controller.gap(layer)) / controller.options["tau"])
                for name, layer in controller.layers.items()}

    for _ in range(epochs):
        rows = torch.randperm(512, generator=order) if shuffle else torch.arange(512)
        for i in range(0, 512, 64):
            batch = rows[i:i + 64]
            optimizer.zero_grad()
            ((model(x[batch]) - y[batch]) ** 2).mean().backward()
            optimizer.step()
        handle.epoch_end()
        history.append(levels())
    x_test, y_test = make_task(kind, 1024, seed=100)
    with torch.no_grad():
        mse = float(((model(x_test) - y_test) ** 2).mean())
    return levels(), history, mse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2, help="the host's Adam learning rate")
    parser.add_argument("--options", type=json.loads, default={}, help="RECM options (JSON)")
    parser.add_argument("--kinds", nargs="+", default=["field", "symmetric"], choices=["field", "symmetric"])
    parser.add_argument("--shuffle", action="store_true", help="a new batch order every epoch")
    held = parser.add_mutually_exclusive_group()
    held.add_argument("--measure-only", dest="hold", action="store_const", const=0.0,
                      help="hold every level at 0 (RECM still measures)")
    parser.add_argument("--split-by-position", action="store_true",
                        help="each probe map learns from its half of each batch's rows, not of the samples")
    held.add_argument("--hold-at-one", dest="hold", action="store_const", const=1.0,
                      help="hold every level at 1 (RECM still measures and probes): the probing steps' own cost")
    parser.add_argument("--host-skips-probes", action="store_true",
                        help="the model's parameters do not step on probing steps (only the probe maps learn)")
    parser.add_argument("--fixed", action="store_true",
                        help="also train each seed with the `fixed` branch (γ = 1 throughout, no probes) and give "
                             "RECM's test MSE over it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| data | epochs (steps) | " + " | ".join(f"level {t}: median [min, max]" for t in TARGETS)
          + " | seeds with a level > 0.1 | epochs with every level 0 (median) | test MSE (median) |"
          + (" / `fixed`'s, per seed: median [min, max] |" if args.fixed else ""))
    print("|---|---|" + "---|" * len(TARGETS) + "---|---|---|" + ("---|" if args.fixed else ""))
    for kind in args.kinds:
        for epochs in args.epochs:
            runs = [run(kind, epochs, seed, args.options, args.lr, args.shuffle, args.hold, args.split_by_position,
                        host_skips_probes=args.host_skips_probes) for seed in range(args.seeds)]
            cells = []
            for target in TARGETS:
                ends = [levels[target] for levels, _, _ in runs]
                cells.append(f"{statistics.median(ends):.2f} [{min(ends):.2f}, {max(ends):.2f}]")
            above = sum(max(levels.values()) > 0.1 for levels, _, _ in runs)
            off = statistics.median(sum(max(l.values()) == 0 for l in history) / epochs for _, history, _ in runs)
            mse = statistics.median(m for _, _, m in runs)
            ratio = ""
            if args.fixed:
                ratios = [m / run(kind, epochs, seed, {}, args.lr, args.shuffle, controller="fixed")[2]
                          for seed, (_, _, m) in enumerate(runs)]
                ratio = f" {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] |"
            print(f"| {kind} | {epochs} ({epochs * 8}) | " + " | ".join(cells)
                  + f" | {above} of {args.seeds} | {off:.0%} | {mse:.2e} |" + ratio, flush=True)


if __name__ == "__main__":
    main()
