"""SevenNet-0 training-step time, relaxed vs vanilla (the shipped 842k-parameter model, same batch, one run), and
exported-model inference.

    .venv-nequip/bin/python benchmarks/sevenn_speed.py [--clusters 4] [--repeats 5] [--steps 5] [--threads 2]
        [--device cuda]
        [--branch linear|lowrank|mlp] [--controllers fixed recm]
        [--controller-options '{"recm": {"allowance": "rows"}}']

A training step is what sevenn's ``Trainer.run_one_epoch`` does per batch:
forward through ``AtomGraphSequential`` (forces by autograd), energy + force
MSE, backward, Adam step; the controller runs from the optimizer's step, as
``equirelax-sevenn`` runs it. Default targets (the 10 self-interaction linears).
Variants are timed interleaved; medians of repeats.
"""

from __future__ import annotations

import argparse

import torch

import equirelax
from _timing import (TIMING_BUDGET, add_controllers_option, device_sync, print_table, relaxed_variants,
                     time_variants)  # benchmarks/ is on sys.path when run as a script


def make_batch(n: int, cutoff: float):
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import atoms_to_graph
    from torch_geometric.loader import DataLoader

    from equirelax.datasets.emt import emt_configurations

    graphs = []
    for atoms in emt_configurations(n, seed=0, field=[0.0, 0.0, 0.3]):
        energy, forces = atoms.info.pop("REF_energy"), atoms.arrays.pop("REF_forces")
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        graphs.append(AtomGraphData.from_numpy_dict(atoms_to_graph(atoms, cutoff, y_from_calc=True)))
    return next(iter(DataLoader(graphs, batch_size=n)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--branch", default="linear", choices=["linear", "lowrank", "mlp"])
    add_controllers_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sevenn.util import model_from_checkpoint, pretrained_name_to_path

    base, config = model_from_checkpoint(pretrained_name_to_path("7net-0"))
    base.to(args.device)
    batch = make_batch(args.clusters, float(config["cutoff"])).to(args.device)
    variants = relaxed_variants(base, lambda model, controller, options: equirelax.relax(
        model, controller, adapter="sevenn", branch=args.branch, total_steps=TIMING_BUDGET, **options),
        args.controllers,
        extra=args.controller_options)

    def forward(model):
        data = batch.clone()
        data["edge_vec"].requires_grad_(True)
        return model(data)

    def loss(model):
        out = forward(model)
        return ((out["inferred_total_energy"] - out["total_energy"]) ** 2).mean() \
            + ((out["inferred_force"] - out["force_of_atoms"]) ** 2).mean()

    train, infer = time_variants(variants, loss, forward, args.repeats, args.steps, device_sync(args.device))
    print(f"# SevenNet-0 (7net-0, 842k parameters), {args.branch} branch on the 10 self-interaction linears, batch of "
          f"{args.clusters} EMT clusters ({batch['pos'].shape[0]} atoms), float32, {args.device}, {args.threads} threads, "
          f"median of {args.repeats} repeats of {args.steps} steps, variants interleaved\n")
    print_table(train, infer)


if __name__ == "__main__":
    main()
