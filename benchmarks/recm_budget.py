"""RECM's levels against the run's budget, on the README's plain-loop example (field and symmetric data,
512 samples, batch 64, Adam at ``--lr`` (1e-2), default options unless ``--options``), over model-initialisation
seeds.

    .venv-mace/bin/python benchmarks/recm_budget.py [--epochs 20 60] [--seeds 12] [--lr 1e-2] [--options '{"warmup": 0.5}']

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
from equirelax.datasets.synthetic import gated_e3nn_model, make_task

TARGETS = ["0", "2"]


def run(kind: str, epochs: int, seed: int, options: dict, lr: float = 1e-2):
    """The README example with ``epochs`` epochs: (end levels, levels after each epoch, test MSE)."""
    torch.manual_seed(seed)
    model = gated_e3nn_model()
    x, y = make_task(kind, 512)
    handle = equirelax.relax(model, controller="recm", targets=TARGETS, branch="linear", total_steps=epochs * 8,
                             **options)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=lr))
    history = []
    for _ in range(epochs):
        for i in range(0, 512, 64):
            optimizer.zero_grad()
            ((model(x[i:i + 64]) - y[i:i + 64]) ** 2).mean().backward()
            optimizer.step()
        handle.epoch_end()
        history.append(handle.levels())
    x_test, y_test = make_task(kind, 1024, seed=100)
    with torch.no_grad():
        mse = float(((model(x_test) - y_test) ** 2).mean())
    return handle.levels(), history, mse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2, help="the host's Adam learning rate")
    parser.add_argument("--options", type=json.loads, default={}, help="RECM options (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| data | epochs (steps) | " + " | ".join(f"level {t}: median [min, max]" for t in TARGETS)
          + " | seeds with a level > 0.1 | epochs with every level 0 (median) | test MSE (median) |")
    print("|---|---|" + "---|" * len(TARGETS) + "---|---|---|")
    for kind in ("field", "symmetric"):
        for epochs in args.epochs:
            runs = [run(kind, epochs, seed, args.options, args.lr) for seed in range(args.seeds)]
            cells = []
            for target in TARGETS:
                ends = [levels[target] for levels, _, _ in runs]
                cells.append(f"{statistics.median(ends):.2f} [{min(ends):.2f}, {max(ends):.2f}]")
            above = sum(max(levels.values()) > 0.1 for levels, _, _ in runs)
            off = statistics.median(sum(max(l.values()) == 0 for l in history) / epochs for _, history, _ in runs)
            mse = statistics.median(m for _, _, m in runs)
            print(f"| {kind} | {epochs} ({epochs * 8}) | " + " | ".join(cells)
                  + f" | {above} of {args.seeds} | {off:.0%} | {mse:.2e} |", flush=True)


if __name__ == "__main__":
    main()
