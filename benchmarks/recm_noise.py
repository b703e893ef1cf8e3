"""RECM's gap against its noise allowance, per layer, in the setting of the finite-symmetric-set test
(``test_recm_reads_no_level_off_a_finite_symmetric_set_the_host_has_not_fitted_yet``: float64, the e3nn
``Linear → Gate → Linear``, ``--n`` samples reshuffled every epoch, batch 64, Adam at ``--lr``, RECM at its
defaults).

    .venv-mace/bin/python benchmarks/recm_noise.py [--kind symmetric] [--n 512] [--lr 1e-3] [--steps 480]
        [--seeds 0-15] [--strength 1.0] [--probe-only 2] [--rotation-null] [--options '{"allowance": "rows"}']

RECM keeps a gap where EMA(b²) exceeds its noise allowance 2·EMA(ν²)/√p (p: RECM's ``noise_entries``, the
probe maps' entries, or with ``--options '{"allowance": "rows"}'`` from the rows' second moments), i.e. where
the ratio r = EMA(b²)/EMA(ν²) exceeds 2/√p: the allowance assumes that the inner product of two independent
noise maps scatters by ν²/√p. Per seed this prints each layer's end level and r;
then, per layer, r's mean and rms over the seeds and the number of independent entries 1/rms² that rms
implies (on symmetric data r has no signal, so its rms is the scatter the allowance stands for), beside p.
``--probe-only NAME``: only that layer probes; every other layer is held at γ = 0 (no branch, no probe).
``--rotation-null``: also r of the end maps over the training set (no EMA), and the spread, over 64 random
rotations R, of ⟨V_a x, (R·V_b) x⟩ / ν² for the end maps over the training set (R·V = D_out(R) V D_in(R)ᵀ):
a null whose scale is measured from the maps themselves; and the same spread of ⟨D x, (R·D) x⟩ / ν² for
their difference D = (V_a − V_b)/√2, which holds no signal.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import mace  # noqa: F401  (e3nn 0.4.4 imports under torch >= 2.6 only after mace)
import equirelax
from e3nn import o3
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


def probe_only(controller, name: str):
    """Every layer but ``name`` stops probing and is held at γ = 0."""
    for other, layer in controller.layers.items():
        if other != name:
            layer.gamma.data.fill_(0.0)
    set_probing = controller._set_probing

    def only_this_layer():
        set_probing()
        for other, layer in controller.layers.items():
            layer.probing = layer.probing and other == name

    controller._set_probing = only_this_layer
    only_this_layer()


def rotation_null(controller, model, x, rotations: int = 64) -> dict[str, tuple[float, float, float]]:
    """Per layer: the spreads over random rotations R of ⟨V_a x, (R·V_b) x⟩ / ν² and of ⟨D x, (R·D) x⟩ / ν² (D the
    maps' half difference), the end maps' non-equivariant parts on ``x`` (each layer's own inputs), and r of the
    end maps on ``x`` itself (one probe's b²/ν² over the whole set, without the EMA). If V_b's law
    is rotation-invariant and independent of V_a (no signal), ⟨V_a x, (R·V_b) x⟩ has the law of ⟨V_a x, V_b x⟩."""
    inputs = {}
    hooks = [layer.register_forward_hook(lambda module, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in controller.layers.items()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        matrices = o3.rand_matrix(rotations)
    spreads = {}
    for name, layer in controller.layers.items():
        rows = inputs[name]
        maps = layer.probe_B @ layer.probe_A
        off = maps - torch.stack([layer.equivariant_weight(maps[0]), layer.equivariant_weight(maps[1])])
        difference = (off[0] - off[1]) / 2**0.5
        first, second = rows @ off[0].T, rows @ off[1].T
        noise = (first - second).pow(2).sum() / 2
        if float(noise) == 0:  # maps that never trained (--probe-only)
            spreads[name] = float("nan"), float("nan"), float("nan")
            continue
        pairs, differences = [], []
        for matrix in matrices:
            d_out, d_in = layer.irreps_out.D_from_matrix(matrix), layer.branch_irreps_in.D_from_matrix(matrix)
            pairs.append(float((first * (rows @ (d_out @ off[1] @ d_in.T).T)).sum() / noise))
            differences.append(float(((rows @ difference.T) * (rows @ (d_out @ difference @ d_in.T).T)).sum() / noise))
        at_end = float((first * second).sum() / noise)  # r of the end maps over the set, no EMA
        spreads[name] = statistics.pstdev(pairs), statistics.pstdev(differences), at_end
    return spreads


def run(seed: int, kind: str, n: int, lr: float, steps: int, strength: float, only: str | None,
        rotations: bool = False, options: dict | None = None):
    """(end levels, r per layer, p per layer, the rotation null's spreads per layer or None)."""
    torch.manual_seed(seed)
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", total_steps=steps, **(options or {}))
    controller = handle.controller
    if only is not None:
        probe_only(controller, only)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr))
    x, y = make_task(kind, n, seed=seed, field_strength=strength)
    order = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for rows in torch.randperm(n, generator=order).split(64):
            if step == steps:
                break
            optimizer.zero_grad()
            (model(x[rows]) - y[rows]).pow(2).mean().backward()
            optimizer.step()
            step += 1
        handle.epoch_end()
    spreads = rotation_null(controller, model, x) if rotations else None
    ratios, entries = {}, {}
    for name, layer in controller.layers.items():
        ratios[name] = float(layer.state("gap") / layer.state("noise").clamp(min=1e-300))
        entries[name] = float(controller.noise_entries(layer))
    return handle.levels(), ratios, entries, spreads


def seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="symmetric", choices=["symmetric", "field"])
    parser.add_argument("--n", type=int, default=512, help="training samples")
    parser.add_argument("--lr", type=float, default=1e-3, help="the host's Adam learning rate")
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--seeds", type=seeds, default=seeds("0-15"), help="a range, e.g. 0-15")
    parser.add_argument("--strength", type=float, default=1.0, help="the field's strength (field data)")
    parser.add_argument("--probe-only", default=None, help="only this layer probes (the others held at 0)")
    parser.add_argument("--rotation-null", action="store_true", help="also the rotation null's spread per layer")
    parser.add_argument("--options", type=json.loads, default={}, help='RECM options, e.g. \'{"allowance": "rows"}\'')
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    results = []
    for seed in args.seeds:
        levels, ratios, entries, spreads = run(seed, args.kind, args.n, args.lr, args.steps, args.strength,
                                               args.probe_only, args.rotation_null, args.options)
        results.append((ratios, entries, spreads))
        print(f"seed {seed}: " + ", ".join(
            f"layer {name} level {levels[name]:.2f} r {ratios[name]:+.3f} p {entries[name]:.0f}"
            + (f" rotation null {spreads[name][0]:.3f} (difference {spreads[name][1]:.3f}),"
               f" end maps' r over the set {spreads[name][2]:+.3f}" if spreads else "")
            for name in ratios), flush=True)
    print("\n| layer | allowance 2/√p (mean) | r: mean | r: rms | 1/rms² (p, mean) | seeds with r > 2/√p |"
          + (" end maps' r over the set: rms |" if args.rotation_null else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.rotation_null else ""))
    for name in results[0][1]:
        values = [ratios[name] for ratios, _, _ in results]
        rms = statistics.fmean(v * v for v in values) ** 0.5
        if rms == 0:  # a layer that never probed (--probe-only)
            continue
        over = sum(ratios[name] > 2 / entries[name]**0.5 for ratios, entries, _ in results)
        p = statistics.fmean(entries[name] for _, entries, _ in results)
        at_end = (f" {statistics.fmean(spreads[name][2] ** 2 for _, _, spreads in results) ** 0.5:.3f} |"
                  if args.rotation_null else "")
        print(f"| {name} | {2 / p**0.5:.3f} | {statistics.fmean(values):+.3f} | {rms:.3f} | {1 / rms**2:.0f} ({p:.0f}) "
              f"| {over} of {len(values)} |{at_end}")


if __name__ == "__main__":
    main()
