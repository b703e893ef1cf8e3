"""Relaxed vs vanilla e3nn training on generated data: accuracy per controller, and step time.

    python benchmarks/e3nn_synthetic.py accuracy [--steps N] [--seeds K] [--runs vanilla fixed recm]
        [--controller-options '{"recm": {"probe_every": 4}}']
    python benchmarks/e3nn_synthetic.py speed [--repeats K]
    python benchmarks/e3nn_synthetic.py ace
    python benchmarks/e3nn_synthetic.py recm

ace: equality ACE's γ on symmetric data at budgets of 75 to 10000 steps and two
constant learning rates, the budget-paced default (dual="budget") against the
papers' gradient form (dual="gradient", dual_lr 1e-3, no augmented term).
recm: RECM's level and gap per layer at defaults, 1500 steps over epochs of a
finite training set, varying the batch size, the start, the field strength and
the set's size.

accuracy: a gated e3nn network (Linear → Gate → Linear) trained on the
symmetric and the external-field synthetic tasks (equirelax.datasets.synthetic)
with each controller and without relaxation; test MSE of the relaxed model and
of its exported (merged, exactly equivariant) model, final γ per layer.
speed: training-step time of a wider e3nn model relaxed with each controller
vs the same model unrelaxed, medians of repeats, ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import equirelax
from equirelax.core._e3nn import o3
from equirelax.datasets.synthetic import gated_e3nn_model, make_task
from _timing import TIMING_BUDGET, device_sync, option_rows, relaxed_variants  # benchmarks/ is on sys.path


CONTROLLERS = [
    ("vanilla", None, {}),
    ("fixed", "fixed", {}),
    ("cr", "cr", {"epochs": 10}),
    ("ace", "ace", {}),
    ("ace (papers' gradient form)", "ace", {"dual": "gradient"}),
    ("ace (equivariant part kept)", "ace", {"keep_equivariant_part": True}),
    ("ace-resilient", "ace-resilient", {}),
    ("recm", "recm", {}),
]


def run_accuracy(kind, label, controller, options, steps, seed, n_train=2048, lr=1e-2):
    torch.manual_seed(seed)
    model = gated_e3nn_model()
    x, y = make_task(kind, n_train, seed=seed)
    xt, yt = make_task(kind, 1024, seed=10_000 + seed)
    handle = equirelax.relax(model, controller, branch="linear", total_steps=steps, **options) if controller else None
    opt = torch.optim.Adam(model.parameters(), lr)
    if handle:
        handle.wrap(opt)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-3)
    generator = torch.Generator().manual_seed(seed)
    epoch_every = max(steps // 10, 1)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n_train, (64,), generator=generator)
        opt.zero_grad()
        (model(x[idx]) - y[idx]).pow(2).mean().backward()
        opt.step()
        scheduler.step()
        if handle and (step + 1) % epoch_every == 0:
            handle.epoch_end()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        relaxed = float((model(xt) - yt).pow(2).mean())
        levels = handle.levels() if handle else {}
        if handle:
            equirelax.export(model, mode="merge")
        exported = float((model(xt) - yt).pow(2).mean())
    error = equirelax.equivariance_error(model, xt[:256]).max
    return {"relaxed": relaxed, "exported": exported, "levels": levels, "eq_error": error, "seconds": seconds}


def accuracy(args):
    torch.set_default_dtype(torch.float64)
    print(f"# accuracy: {args.steps} steps, batch 64, 2048 training samples, seeds {list(range(args.seeds))}")
    for kind in ("symmetric", "field"):
        print(f"\n## {kind} data: test MSE (mean ± std over seeds)\n")
        print("| model | relaxed | exported (merged, equivariant) | final γ per layer | exported eq. error |")
        print("|---|---|---|---|---|")
        rows = [row for row in CONTROLLERS if not args.runs or row[0] in args.runs]
        for label, controller, options in rows + option_rows(CONTROLLERS, args.controller_options, args.runs):
            rows = [run_accuracy(kind, label, controller, options, args.steps, seed) for seed in range(args.seeds)]

            def fmt(key):
                values = [r[key] for r in rows]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.2e} ± {std:.1e}"

            levels = {n: statistics.mean(r["levels"][n] for r in rows) for n in rows[0]["levels"]}
            level_text = ", ".join(f"{n}: {v:.3f}" for n, v in levels.items()) or "-"
            eq = max(r["eq_error"] for r in rows)
            relaxed = fmt("relaxed") if controller else "-"
            print(f"| {label} | {relaxed} | {fmt('exported')} | {level_text} | {eq:.1e} |", flush=True)


def linear_stack():
    """Worst case for a dense branch: nothing but block-sparse o3.Linear layers."""
    irreps_in, hidden = "32x0e+16x1o+8x2e", "64x0e+32x1o+16x2e"
    model = torch.nn.Sequential(
        o3.Linear(irreps_in, hidden),
        o3.Linear(hidden, hidden),
        o3.Linear(hidden, "1x0e+1x1o"),
    )
    return model, (o3.Irreps(irreps_in).dim,), None


class TensorProductNet(torch.nn.Module):
    """A typical e3nn block, twice: features ⊗ spherical harmonics → o3.Linear (relaxed)."""

    def __init__(self, hidden="16x0e+8x1o+4x2e", sh="1x0e+1x1o+1x2e"):
        super().__init__()
        self.embed = o3.Linear("8x0e", hidden)
        self.tp1 = o3.FullyConnectedTensorProduct(hidden, sh, hidden)
        self.lin1 = o3.Linear(hidden, hidden)
        self.tp2 = o3.FullyConnectedTensorProduct(hidden, sh, hidden)
        self.lin2 = o3.Linear(hidden, hidden)
        self.out = o3.Linear(hidden, "1x0e+1x1o")

    def forward(self, scalars, sh):
        h = self.embed(scalars)
        h = h + self.lin1(self.tp1(h, sh))
        h = h + self.lin2(self.tp2(h, sh))
        return self.out(h)


def tensor_product_net():
    return TensorProductNet(), (8, 9), ["lin1", "lin2"]


def time_steps(model, handle, inputs, y, steps, sync=lambda: None):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    if handle:
        handle.wrap(opt)
    for _ in range(3):  # warm-up
        opt.zero_grad()
        (model(*inputs) - y).pow(2).mean().backward()
        opt.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        (model(*inputs) - y).pow(2).mean().backward()
        opt.step()
    sync()  # queued device work belongs to the timed steps
    return (time.perf_counter() - start) / steps


def speed(args):
    torch.set_num_threads(args.threads)
    print(f"# speed: {args.branch} branch{'' if args.rank is None else f' (rank {args.rank})'}, "
          f"batch {args.batch} rows, float32, {args.device}, {args.threads} threads, median of {args.repeats} repeats "
          f"of {args.steps} steps, variants interleaved\n")
    for title, build in (
        ("o3.Linear stack 32x0e+16x1o+8x2e → 64x0e+32x1o+16x2e → … → 1x0e+1x1o, every layer relaxed", linear_stack),
        ("tensor-product net (2 × FullyConnectedTensorProduct + o3.Linear, 16x0e+8x1o+4x2e), "
         "the two o3.Linear after the tensor products relaxed", tensor_product_net),
    ):
        torch.manual_seed(0)
        base, dims, targets = build()
        base.to(args.device)
        inputs = tuple(torch.randn(args.batch, d, device=args.device) for d in dims)
        y = torch.randn(args.batch, 4, device=args.device)
        sync = device_sync(args.device)
        variants = relaxed_variants(base, lambda model, controller, options: equirelax.relax(
            model, controller, targets=targets, branch=args.branch, rank=args.rank, total_steps=TIMING_BUDGET,
            **options), rows=CONTROLLERS)
        times = {label: [] for label in variants}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for label, (model, handle) in variants.items():
                times[label].append(time_steps(model, handle, inputs, y, args.steps, sync))
        vanilla, fixed = statistics.median(times["vanilla"]), statistics.median(times["fixed"])
        print(f"## {title}\n")
        print("| model | step time (ms) | relaxed / vanilla | controller overhead (/ fixed) |")
        print("|---|---|---|---|")
        for label in variants:
            median = statistics.median(times[label])
            overhead = "-" if label == "vanilla" else f"{median / fixed:.3f}"
            print(f"| {label} | {1000 * median:.2f} | {median / vanilla:.3f} | {overhead} |")
        print(flush=True)


def ace_budgets(args):
    torch.set_default_dtype(torch.float64)
    print("# equality ACE at defaults, symmetric data, Adam at a constant lr, batch 64, 2048 samples, seed 0\n")
    print("| dual | steps | lr | final max \\|γ\\| | max \\|γ\\| over the last 10% | test MSE (exported) |")
    print("|---|---|---|---|---|---|")
    for dual in ("budget", "gradient"):
        for steps in args.budgets:
            for lr in (5e-3, 1e-3):
                torch.manual_seed(0)
                model = gated_e3nn_model()
                handle = equirelax.relax(model, "ace", branch="linear", total_steps=steps, dual=dual)
                opt = handle.wrap(torch.optim.Adam(model.parameters(), lr))
                x, y = make_task("symmetric", 2048, seed=0)
                xt, yt = make_task("symmetric", 1024, seed=10_000)
                generator = torch.Generator().manual_seed(0)
                trace = []
                for _ in range(steps):
                    idx = torch.randint(0, 2048, (64,), generator=generator)
                    opt.zero_grad()
                    (model(x[idx]) - y[idx]).pow(2).mean().backward()
                    opt.step()
                    trace.append(handle.levels())
                tail = trace[int(0.9 * steps):]
                swing = max(abs(g) for row in tail for g in row.values())
                equirelax.export(model)
                with torch.no_grad():
                    mse = float((model(xt) - yt).pow(2).mean())
                final = max(abs(g) for g in trace[-1].values())
                print(f"| {dual} | {steps} | {lr:g} | {final:.1e} | {swing:.1e} | {mse:.2e} |", flush=True)


RECM_CASES = [  # (label, task, training samples, batch, field strength, gamma0)
    ("field", "field", 2048, 64, 1.0, 1.0), ("field, batch 16", "field", 2048, 16, 1.0, 1.0),
    ("field, batch 256", "field", 2048, 256, 1.0, 1.0), ("field, start γ = 0", "field", 2048, 64, 1.0, 0.0),
    ("field × 0.03", "field", 2048, 64, 0.03, 1.0), ("symmetric", "symmetric", 2048, 64, 1.0, 1.0),
    ("symmetric, batch 256", "symmetric", 2048, 256, 1.0, 1.0), ("symmetric, 256 samples", "symmetric", 256, 64, 1.0, 1.0),
]


def recm_levels(args):
    torch.set_default_dtype(torch.float64)
    steps = args.steps
    print(f"# RECM at defaults: {steps} steps over epochs of the training set, Adam lr 5e-3, seed 0\n")
    print("| data | γ per layer | gap per layer | test MSE (relaxed) |")
    print("|---|---|---|---|")
    for label, kind, n, batch, strength, gamma0 in RECM_CASES:
        torch.manual_seed(0)
        model = gated_e3nn_model()
        handle = equirelax.relax(model, "recm", branch="linear", total_steps=steps, gamma0=gamma0)
        opt = handle.wrap(torch.optim.Adam(model.parameters(), 5e-3))
        x, y = make_task(kind, n, seed=0, field_strength=strength)
        xt, yt = make_task(kind, 1024, seed=100, field_strength=strength)
        generator, step = torch.Generator().manual_seed(0), 0
        while step < steps:
            for rows in torch.randperm(n, generator=generator).split(batch)[: steps - step]:
                opt.zero_grad()
                (model(x[rows]) - y[rows]).pow(2).mean().backward()
                opt.step()
                step += 1
            handle.epoch_end()
        with torch.no_grad():
            mse = float((model(xt) - yt).pow(2).mean())
        metrics = handle.metrics()
        levels = ", ".join(f"{n}: {g:.2f}" for n, g in handle.levels().items())
        gaps = ", ".join(f"{n}: {metrics[f'recm/gap/{n}']:.3f}" for n in handle.layers)
        print(f"| {label} | {levels} | {gaps} | {mse:.2e} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--steps", type=int, default=1500)
    acc.add_argument("--seeds", type=int, default=3)
    acc.add_argument("--runs", nargs="+", help="only these rows (labels, e.g. vanilla recm)")
    acc.add_argument("--controller-options", type=json.loads, default={},
                     help='a further row per named row with these options, e.g. \'{"recm": {"probe_every": 4}}\'')
    spd = sub.add_parser("speed")
    spd.add_argument("--repeats", type=int, default=5)
    spd.add_argument("--steps", type=int, default=20)
    spd.add_argument("--batch", type=int, default=1024)
    spd.add_argument("--threads", type=int, default=2)
    spd.add_argument("--device", default="cpu")
    spd.add_argument("--branch", default="linear", choices=["linear", "lowrank", "mlp"])
    spd.add_argument("--rank", type=int, default=None, help="rank of a lowrank branch (default 8)")
    budgets = sub.add_parser("ace")
    budgets.add_argument("--budgets", type=int, nargs="+", default=[75, 1000, 10000])
    levels = sub.add_parser("recm")
    levels.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    {"accuracy": accuracy, "speed": speed, "ace": ace_budgets, "recm": recm_levels}[args.command](args)


if __name__ == "__main__":
    main()
