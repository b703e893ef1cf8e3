"""Relaxing a foundation-sized model: parameters, training-step time and peak memory, per branch kind.

    cd benchmarks && ../.venv-mace/bin/python foundation_size.py [--steps 4] [--dtype float32] [--save mp0.model]
    cd benchmarks && ../.venv-nequip/bin/python foundation_size.py --host nequip [--steps 4]

The model is MACE-MP-0-medium's architecture (ScaleShiftMACE, hidden 128x0e+128x1o,
max_ell 3, correlation 3, two interactions, r_max 6, 89 elements) built with random
weights by MACE's own classes (no download); ``--save`` writes it as a foundation
file (``torch.save`` of the model, as MACE saves ``.model``) that
``--foundation_model`` takes. The batch is 4 rattled fcc Cu/Al cells of 32 atoms
labelled by EMT. Each variant (vanilla, then the default targets relaxed with each
branch kind) runs in its own process, so peak memory (max RSS) is its own: build,
relax, Adam, ``--steps`` training steps after one warm-up (forces by autograd);
median step time.

``--host nequip``: a NequIP GNN of comparable size built by ``nequip.model.NequIPGNNModel``
(89 types, 48 features, l_max 2, 4 layers, r_max 6: about MP-0-medium's parameter count), relaxed on its default
targets (every convolution's ``linear_1``/``linear_2``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("vanilla", "linear", "lowrank", "mlp")


def build_mp0_medium():
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.manual_seed(0)
    zs = list(range(1, 90))
    return modules.ScaleShiftMACE(
        r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(zs), hidden_irreps=o3.Irreps("128x0e + 128x1o"),
        MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu, atomic_energies=np.zeros(len(zs)),
        avg_num_neighbors=40.0, atomic_numbers=zs, correlation=3, radial_type="bessel",
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ), zs


def build_nequip_large():
    from ase.data import chemical_symbols
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    names = chemical_symbols[1:90]
    return NequIPGNNModel(seed=0, model_dtype="float32", type_names=names, r_max=6.0, l_max=2, parity=True,
                          num_layers=4, num_features=48, radial_mlp_depth=2, radial_mlp_width=64,
                          avg_num_neighbors=40.0), names


def bulk_frames(n=4):
    import numpy as np
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        atoms.numbers[rng.choice(len(atoms), 8, replace=False)] = 13
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = atoms.get_potential_energy(), atoms.get_forces()
        frames.append(atoms)
    return frames


def bulk_batch(zs, n=4):
    from mace.tools import AtomicNumberTable

    from equirelax.adapters.mace import mace_batch

    return mace_batch(bulk_frames(n), AtomicNumberTable(zs), cutoff=6.0)


def measure(host: str, variant: str, steps: int, dtype: str, threads: int) -> dict:
    import torch

    import equirelax

    torch.set_num_threads(threads)
    torch.set_default_dtype(getattr(torch, dtype))
    if host == "mace":
        import mace  # noqa: F401

        from mace_speed import train_loss  # benchmarks/ is on sys.path when run as a script

        model, zs = build_mp0_medium()
        batch = bulk_batch(zs)
        batch_loss = train_loss(batch)
    else:
        from equirelax.adapters.nequip import nequip_batch
        from nequip_speed import train_loss

        model, names = build_nequip_large()
        batch = nequip_batch(bulk_frames(), names, 6.0)
        batch_loss = train_loss(batch)
    handle = None
    if variant != "vanilla":
        handle = equirelax.relax(model, "ace", branch=variant, adapter=host, total_steps=10**6)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    if handle:
        handle.wrap(optimizer)
    model.train()
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        batch_loss(model).backward()
        optimizer.step()
        if step:  # the first step allocates Adam's state and warms up
            times.append(time.perf_counter() - start)
    atoms = batch["positions"].shape[0] if host == "mace" else batch["pos"].shape[0]
    return {"variant": variant, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds_per_step": statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "atoms": int(atoms)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", choices=["mace", "nequip"], default="mace")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in this process
    parser.add_argument("--save", default=None, help="also write the random MP-0-medium-sized model there")
    args = parser.parse_args()
    if args.variant:
        print("RESULT" + json.dumps(measure(args.host, args.variant, args.steps, args.dtype, args.threads)))
        return
    if args.save:
        import torch

        import mace  # noqa: F401

        torch.set_default_dtype(getattr(torch, args.dtype))
        torch.save(build_mp0_medium()[0], args.save)
    rows = []
    for variant in VARIANTS:
        result = subprocess.run([sys.executable, __file__, "--host", args.host, "--variant", variant,
                                 "--steps", str(args.steps),
                                 "--dtype", args.dtype, "--threads", str(args.threads)],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.split("RESULT")[1]))
    base = rows[0]
    what = ("MACE, MP-0-medium architecture" if args.host == "mace" else
            "NequIP, 48 features, l_max 2, 4 layers, 89 types")
    print(f"# {what} (random weights), default targets, ACE, {base['atoms']} atoms "
          f"(4 fcc cells of 32), {args.dtype}, {args.threads} threads, median of {args.steps} training steps, "
          "each variant in its own process\n")
    print("| model | parameters | / vanilla | step (s) | / vanilla | peak RSS (MB) | / vanilla |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        name = row["variant"] if row["variant"] == "vanilla" else f"relaxed, {row['variant']} branch"
        print(f"| {name} | {row['parameters']:,} | {row['parameters'] / base['parameters']:.2f} "
              f"| {row['seconds_per_step']:.2f} | {row['seconds_per_step'] / base['seconds_per_step']:.2f} "
              f"| {row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")


if __name__ == "__main__":
    main()
