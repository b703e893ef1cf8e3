"""Charged N-body (5 particles, positions 1000 steps ahead): EGNN vanilla vs relaxed with each controller.

    .venv-nequip/bin/python benchmarks/nbody.py [--train 3000] [--epochs 300] [--seeds 0 1 2] [--out DIR]
    .venv-nequip/bin/python benchmarks/nbody.py --quick        # the smallest setting (a regression check)
    .venv-nequip/bin/python benchmarks/nbody.py --model steerable [...]   # the e3nn model instead of EGNN
    .venv-nequip/bin/python benchmarks/nbody.py --data egnn [...]         # the EGNN authors' data, exactly
    .venv-nequip/bin/python benchmarks/nbody.py --model steerable --setup ace-reference [...]

For each data set (``symmetric`` and ``field``: a uniform field (0, 0, 1) acting
on the charges) and seed, trains the EGNN of ``equirelax.models.egnn`` as is
(vanilla) and relaxed with each controller (MLP branches on every block's
coordinate update, fed h, raw x and v), same data, seed, epochs and
optimiser (Adam, lr 5e-4, batch 100, as in the EGNN paper). Reports test MSE of
the relaxed model and of its projection (branches dropped: the plain EGNN,
E(3)-equivariant), final γ per layer, the E(3) equivariance error and training
seconds per epoch; writes ``results.json``, ``gamma.png`` (γ per layer over
epochs) and ``validation.png``; ``--sizes`` adds a sample-efficiency curve
(test MSE vs training-set size) for vanilla and one controller.

``--model steerable`` trains the SEGNN-style e3nn network of
``equirelax.models.steerable_nbody`` instead (node scalars |v| and q; Adam lr 2e-3), relaxed by
the e3nn adapter on its default targets (every ``o3.Linear`` and message
tensor product) with linear branches; its projection is ``equirelax.export``
(linear branches merged, tensor-product branches dropped).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import equirelax
from equirelax.models.egnn import EGNN, nbody_graph
from equirelax.core.irreps import random_rotations
from equirelax.datasets.nbody import charged_nbody, egnn_reference_nbody
from equirelax.models.steerable_nbody import SteerableNBody

FIELD = [0.0, 0.0, 1.0]
CONTROLLERS = {
    "vanilla": None,
    "fixed": ("fixed", {}),
    "cr": ("cr", {}),
    "ace": ("ace", {}),  # every controller at its defaults, paced by the run's budget
    "ace-resilient": ("ace-resilient", {}),
    "recm": ("recm", {}),
    "field-input": None,  # the steerable model given the field vector as an input (field data only): no relaxation
}


# name: (build the model, relax() options, export mode, node features include the charge, Adam learning rate)
MODELS = {
    "egnn": (lambda: EGNN(hidden=64, layers=4), {"branch": "mlp", "init": "random"}, "drop", False, 5e-4),
    "steerable": (lambda **kw: SteerableNBody("16x0e + 8x1o", layers=3, hidden=16, **kw),
                  {"branch": "linear", "init": "random"},
                  "merge", True, 2e-3),
}


def load(n, seed, field, node_charges=False):
    data = charged_nbody(n, seed=seed, field=field)
    return nbody_graph(data.positions, data.velocities, data.charges, node_charges), torch.as_tensor(
        data.targets, dtype=torch.get_default_dtype()).reshape(-1, 3)


def batches(graph, targets, systems: int, batch: int, generator=None, particles: int = 5):
    """Minibatches of whole systems (edge indices renumbered per batch), on the data's device, with each
    node's system (its index in the data set)."""
    h, x, v, edges, attr = graph
    device = x.device
    # the order is drawn on the CPU generator, so a seed gives the same batches on every device
    order = (torch.randperm(systems, generator=generator) if generator is not None else torch.arange(systems)).to(device)
    edges_per = particles * (particles - 1)
    node_offsets, edge_offsets = torch.arange(particles, device=device), torch.arange(edges_per, device=device)
    for start in range(0, systems, batch):
        chosen = order[start:start + batch]
        nodes = (chosen[:, None] * particles + node_offsets).reshape(-1)
        edge_rows = (chosen[:, None] * edges_per + edge_offsets).reshape(-1)
        local = edges[:, edge_rows] - (chosen * particles).repeat_interleave(edges_per)
        local = local + (torch.arange(len(chosen), device=device) * particles).repeat_interleave(edges_per)
        systems = chosen.repeat_interleave(particles)
        yield (h[nodes], x[nodes], v[nodes], local, attr[edge_rows]), targets[nodes], systems


def mse(model, graph, targets) -> float:
    with torch.no_grad():
        return float((model(*graph) - targets).pow(2).mean())


def e3_error(model, graph) -> float:
    """E(3) equivariance error; a field given as an input rotates with the system (joint equivariance)."""
    h, x, v, edges, attr = graph
    field = getattr(model, "field", None)
    with torch.no_grad():
        reference = model(h, x, v, edges, attr)
        shift = torch.tensor([0.5, -1.0, 2.0], dtype=x.dtype, device=x.device)
        errors = []
        for R in random_rotations(3, "O3", dtype=x.dtype, generator=torch.Generator().manual_seed(0)).to(x.device):
            if field is not None:
                original = field.detach().clone()
                field.copy_(R.to(field.dtype) @ original)
            out = model(h, x @ R.T + shift, v @ R.T, edges, attr)
            if field is not None:
                field.copy_(original)
            errors.append(float((out - (reference @ R.T + shift)).norm(dim=-1).mean() / reference.norm(dim=-1).mean()))
    return max(errors)


def runs_for(controllers, kind, model_name):
    """The field-input baseline needs a field (field data) and a model that takes one (the steerable model)."""
    return [name for name in controllers if name != "field-input" or (kind == "field" and model_name == "steerable")]


# ``--setup ace-reference`` (steerable model): where the ACE reference code puts its branches (the node updates,
# MLP branches, γ initialised at 1) and its optimiser (Adam lr 9e-4); the controllers keep their defaults
REFERENCE_SETUP = ({"targets": ["blocks.*.update"], "branch": "mlp", "init": "random"}, 9e-4)


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)   # an epoch's time includes its queued kernels


def on_device(data, device):
    """``dataset(...)``'s splits with every tensor on ``device``."""
    def move(item):
        return tuple(move(i) for i in item) if isinstance(item, tuple) else (
            item.to(device) if isinstance(item, torch.Tensor) else item)
    return move(data)


def train(name, data, seed, epochs, model_name="egnn", batch=100, setup="default", device="cpu", options=None,
          sample_ids=False):
    """``options``: the controller's options over its defaults (``--controller-options``); ``sample_ids``: tell
    RECM each node's system (``handle.set_samples``; otherwise it keys each node by its own inputs)."""
    data = on_device(data, device)
    (train_graph, train_targets, n_train), (valid_graph, valid_targets), (test_graph, test_targets) = data
    build, relax_options, export_mode, _, lr = MODELS[model_name]
    if setup == "ace-reference":
        relax_options, lr = REFERENCE_SETUP
    torch.manual_seed(seed)
    model = (build(field=FIELD) if name == "field-input" else build()).to(device)
    handle = None
    if CONTROLLERS[name] is not None:
        controller, defaults = CONTROLLERS[name]
        options = {**defaults, **({"epochs": epochs} if controller == "cr" else {}), **(options or {})}
        handle = equirelax.relax(model, controller, total_steps=epochs * -(-n_train // batch), **relax_options,
                                 **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-12)
    if handle is not None:
        handle.wrap(optimizer)
    generator = torch.Generator().manual_seed(seed)
    curve, gammas, seconds = [], [], []
    for _ in range(epochs):
        start = time.perf_counter()
        for inputs, targets, systems in batches(train_graph, train_targets, n_train, batch, generator):
            if handle is not None and sample_ids:  # RECM's probe maps each learn from their half of the systems
                handle.set_samples(systems)
            optimizer.zero_grad()
            (model(*inputs) - targets).pow(2).mean().backward()
            optimizer.step()
        if handle is not None:
            handle.epoch_end()
            gammas.append(handle.levels())
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        curve.append(mse(model, valid_graph, valid_targets))
    result = {"test_mse_relaxed": mse(model, test_graph, test_targets), "validation": curve, "gamma": gammas,
              "seconds_per_epoch": statistics.median(seconds), "equivariance_error_relaxed": e3_error(model, test_graph)}
    if handle is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "could not merge ...": tensor-product branches are dropped, as meant
            equirelax.export(model, mode=export_mode)
    result["test_mse_projected"] = mse(model, test_graph, test_targets)
    result["equivariance_error_projected"] = e3_error(model, test_graph)
    return result


def dataset(kind, n_train, n_test, seed, model_name="egnn", data="simulated", cache=None):
    field = FIELD if kind == "field" else None
    charges = MODELS[model_name][3]
    if data == "egnn":  # the authors' fixed data set (its own seed); the run's seed varies the model only
        splits = egnn_splits(tuple(field) if field else None, max(n_train, n_test), cache)

        def graph(split, n):
            part = splits[split]
            return nbody_graph(part.positions[:n], part.velocities[:n], part.charges[:n], charges), torch.as_tensor(
                part.targets[:n], dtype=torch.get_default_dtype()).reshape(-1, 3)

        train_graph, train_targets = graph("train", n_train)
        return (train_graph, train_targets, n_train), graph("valid", n_test), graph("test", n_test)
    train_graph, train_targets = load(n_train, 1000 + seed, field, charges)
    valid = load(n_test, 2000 + seed, field, charges)
    test = load(n_test, 3000 + seed, field, charges)
    return (train_graph, train_targets, n_train), valid, test


@functools.lru_cache(maxsize=2)
def egnn_splits(field, systems, cache=None):
    """The authors' splits; with ``cache`` (a folder) saved there once and read back by later runs."""
    if cache is None:
        return egnn_reference_nbody(max_samples=systems, field=field)
    import numpy as np

    from equirelax.datasets.nbody import NBodyData

    path = Path(cache) / f"egnn-{'symmetric' if field is None else 'field-' + '_'.join(map(str, field))}-{systems}.npz"
    if not path.exists():
        splits = egnn_reference_nbody(max_samples=systems, field=field)
        Path(cache).mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.npz")   # written whole, then renamed: parallel runs share it
        np.savez(partial, **{f"{split}_{key}": getattr(part, key) for split, part in splits.items()
                             for key in ("positions", "velocities", "charges", "targets")})
        partial.replace(path)
    with np.load(path) as saved:
        return {split: NBodyData(*(saved[f"{split}_{key}"] for key in ("positions", "velocities", "charges", "targets")))
                for split in ("train", "valid", "test")}


def short(layer: str) -> str:
    """A relaxed layer's name without the model's container prefix (``blocks.0.update`` → ``0.update``)."""
    return layer.removeprefix("blocks.").removesuffix(".coordinate_update")


def table(results, kind):
    lines = [f"## {kind}", "", "| model | test MSE relaxed | test MSE projected (equivariant) | projected, per seed | "
             "final γ per layer | E(3) error relaxed / projected | s / epoch |", "|---|---|---|---|---|---|---|"]
    for name, runs in results[kind].items():
        def mean_std(key):
            values = [r[key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2e} ± {std:.1e}"

        last = [r["gamma"][-1] for r in runs if r["gamma"]]
        gamma = ", ".join(f"{short(k)}: {statistics.mean(g[k] for g in last):.3f}" for k in last[0]) if last \
            else "-"
        relaxed = mean_std("test_mse_relaxed") if CONTROLLERS[name] is not None else "-"
        eq = f"{max(r['equivariance_error_relaxed'] for r in runs):.1e} / " \
             f"{max(r['equivariance_error_projected'] for r in runs):.1e}"
        per_seed = ", ".join(f"{r['test_mse_projected']:.2e}" for r in runs)
        lines.append(f"| {name} | {relaxed} | {mean_std('test_mse_projected')} | {per_seed} | {gamma} | {eq} | "
                     f"{statistics.median(r['seconds_per_epoch'] for r in runs):.2f} |")
    return "\n".join(lines)


def plots(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results)
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for name, runs in results[kind].items():
            axis.semilogy(range(1, len(runs[0]["validation"]) + 1), runs[0]["validation"], label=name)
        axis.set_title(f"{kind}: validation MSE (seed {0})")
        axis.set_xlabel("epoch")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "validation.png", dpi=100)
    plt.close(figure)
    relaxed = [(kind, name) for kind in kinds for name, runs in results[kind].items() if runs[0]["gamma"]]
    if relaxed:
        figure, axes = plt.subplots(len(kinds), len(relaxed) // len(kinds), figsize=(16, 3.2 * len(kinds)),
                                    squeeze=False, sharey=True)
        for axis, (kind, name) in zip(axes.reshape(-1), relaxed):
            trajectory = results[kind][name][0]["gamma"]
            for layer in trajectory[0]:
                axis.plot(range(1, len(trajectory) + 1), [g[layer] for g in trajectory], label=short(layer))
            axis.set_title(f"{kind}: {name}", fontsize="small")
        axes[0][0].set_ylabel("γ")
        axes[0][-1].legend(fontsize="x-small", title="block")
        figure.tight_layout()
        figure.savefig(out / "gamma.png", dpi=100)
        plt.close(figure)


def arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="egnn", choices=list(MODELS))
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--kinds", nargs="+", default=["symmetric", "field"], choices=["symmetric", "field"])
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS), choices=list(CONTROLLERS))
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="training-set sizes for a sample-efficiency curve (vanilla vs --best)")
    parser.add_argument("--best", default="recm", help="the controller of the sample-efficiency curve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("nbody-output"))
    parser.add_argument("--setup", default="default", choices=["default", "ace-reference"],
                        help="ace-reference (steerable model): MLP branches on the node updates only, Adam lr 9e-4, "
                             "as the ACE reference code")
    parser.add_argument("--data", default="simulated", choices=["simulated", "egnn"],
                        help="simulated: the exactly symmetric generator (default); egnn: the EGNN authors' data set, "
                             "generated exactly (per-component force clipping; fixed data, the seed varies the model)")
    parser.add_argument("--controller-options", type=json.loads, default={},
                        help='JSON: options per controller over its defaults, e.g. \'{"ace": {"horizon": 0.5}}\'')
    parser.add_argument("--device", default="cpu", help="torch device to train on (cuda on a GPU)")
    parser.add_argument("--cache", type=Path, help="folder to keep --data egnn's generated splits in (made once)")
    parser.add_argument("--sample-ids", action="store_true",
                        help="RECM: give each node's system with handle.set_samples (default: each node keyed by "
                             "itself)")
    parser.add_argument("--quick", action="store_true", help="smallest setting: 200 systems, 3 epochs, 1 seed")
    return parser


def main(argv=None):
    parser = arguments()
    args = parser.parse_args(argv)
    if args.setup == "ace-reference" and args.model != "steerable":
        parser.error("--setup ace-reference is for --model steerable (the SEGNN-style model)")
    relaxed = sorted(n for n, c in CONTROLLERS.items() if c is not None)
    unknown = sorted(set(args.controller_options) - set(relaxed))
    if unknown:
        parser.error(f"--controller-options names {unknown}; it takes {relaxed}")
    if args.quick:
        args.train, args.test, args.epochs, args.seeds = 200, 100, 3, [0]
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.kinds:
        names = runs_for(args.controllers, kind, args.model)
        results[kind] = {name: [] for name in names}
        for seed in args.seeds:
            data = dataset(kind, args.train, args.test, seed, args.model, args.data, args.cache)
            for name in names:
                result = train(name, data, seed, args.epochs, args.model, setup=args.setup, device=args.device,
                               options=args.controller_options.get(name), sample_ids=args.sample_ids)
                results[kind][name].append(result)
                print(f"{kind} seed {seed} {name}: test MSE relaxed {result['test_mse_relaxed']:.3e} projected "
                      f"{result['test_mse_projected']:.3e} ({result['seconds_per_epoch']:.2f} s/epoch)", flush=True)
    efficiency = {}
    for size in args.sizes:
        data = None
        for name in ("vanilla", args.best):
            if size == args.train and name in results[args.kinds[0]]:
                result = results[args.kinds[0]][name][0]   # the same run as the table's first seed
            else:
                data = data or dataset(args.kinds[0], size, args.test, args.seeds[0], args.model, args.data, args.cache)
                result = train(name, data, args.seeds[0], args.epochs, args.model, setup=args.setup,
                               device=args.device, options=args.controller_options.get(name),
                               sample_ids=args.sample_ids)
            efficiency.setdefault(name, []).append([size, result["test_mse_relaxed"], result["test_mse_projected"]])
            print(f"size {size} {name}: {result['test_mse_relaxed']:.3e} / {result['test_mse_projected']:.3e}")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results, "sample_efficiency": efficiency}))
    plots(results, args.out)
    print(f"\n# N-body, {args.model} ({args.setup} setup), {args.data} data: {args.train} training systems, {args.test} test, {args.epochs} epochs, seeds {args.seeds}\n")
    for kind in args.kinds:
        print(table(results, kind) + "\n")
    if efficiency:
        print(f"## sample efficiency ({args.kinds[0]}): test MSE (relaxed / projected)\n")
        print("| training systems | " + " | ".join(efficiency) + " |\n|---|" + "---|" * len(efficiency))
        for i, size in enumerate(args.sizes):
            print(f"| {size} | " + " | ".join(f"{efficiency[n][i][1]:.2e} / {efficiency[n][i][2]:.2e}"
                                           for n in efficiency) + " |")
    return results


if __name__ == "__main__":
    main()
