"""MACE adapter (MACE environment only): bit-identical at step 0, exported model is plain and equivariant."""

import io

import numpy as np
import pytest
import torch

mace = pytest.importorskip("mace")

import equirelax  # noqa: E402
from equirelax.adapters.mace import DEFAULT_TARGETS, mace_batch, mace_equivariance_error  # noqa: E402
from equirelax.datasets.emt import emt_configurations  # noqa: E402


def tiny_mace():
    from e3nn import o3
    from mace import modules, tools

    table = tools.AtomicNumberTable([13, 29])
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
        gate=torch.nn.functional.silu, atomic_energies=np.zeros(2), avg_num_neighbors=8,
        atomic_numbers=table.zs, correlation=2, radial_type="bessel", atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    return model, table


def batch_of(table, n=3, seed=0, field=None):
    return mace_batch(emt_configurations(n, seed=seed, field=field), table, cutoff=4.0)


def predict(model, batch):
    out = model(batch, training=False, compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


@pytest.mark.parametrize("controller", ["ace", "recm", "cr"])
def test_relaxed_mace_is_bit_identical_at_step_zero(controller):
    model, table = tiny_mace()
    batch = batch_of(table)
    predict(model, batch)  # MACE's first call differs in the last bit from later ones: compare warm calls
    energy, forces = predict(model, batch)
    handle = equirelax.relax(model, controller, **({"epochs": 2} if controller == "cr" else {}))
    assert handle.adapter.name == "mace"
    assert sorted(handle.layers) == ["interactions.0.linear", "interactions.1.linear", "products.0.linear",
                                     "products.1.linear"]
    relaxed_energy, relaxed_forces = predict(model, batch)
    assert torch.equal(relaxed_energy, energy) and torch.equal(relaxed_forces, forces)


def test_pretrained_model_file_relaxes_with_identical_predictions(tmp_path):
    model, table = tiny_mace()
    path = tmp_path / "pretrained.model"
    torch.save(model, path)
    batch = batch_of(table)
    loaded = torch.load(path, weights_only=False)
    predict(loaded, batch)
    energy, forces = predict(loaded, batch)
    equirelax.relax(loaded, "recm")
    assert all(torch.equal(a, b) for a, b in zip(predict(loaded, batch), (energy, forces)))


@pytest.mark.parametrize("branch,options", [("linear", {}), ("lowrank", {"rank": 4})])
def test_trained_relaxed_mace_exports_to_plain_equivariant_mace(branch, options):
    model, table = tiny_mace()
    batch = batch_of(table, field=[0.0, 0.0, 0.5])
    handle = equirelax.relax(model, "fixed", branch=branch, init="random", init_std=0.05, **options)
    opt = handle.wrap(torch.optim.Adam(model.parameters(), 1e-2))
    for _ in range(5):
        opt.zero_grad()
        out = model(batch, training=True, compute_force=True)
        ((out["energy"] - batch["energy"]) ** 2).mean().add(((out["forces"] - batch["forces"]) ** 2).mean()).backward()
        opt.step()
    relaxed_error = mace_equivariance_error(model, batch)
    assert relaxed_error["forces"]["mean"] > 1e-4
    with handle.projected():
        projected = predict(model, batch)
    equirelax.export(model, mode="merge")
    exported = predict(model, batch)
    assert torch.allclose(exported[0], projected[0], atol=1e-10) and torch.allclose(exported[1], projected[1], atol=1e-10)
    error = mace_equivariance_error(model, batch, n_rotations=4)
    assert error["energy"]["max"] < 1e-10 and error["forces"]["max"] < 1e-10
    assert type(model).__name__ == "ScaleShiftMACE"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert b"equirelax" not in buffer.getvalue()


def test_default_targets_are_documented_patterns():
    assert DEFAULT_TARGETS == ("interactions.*.linear", "products.*.linear")


def test_ace_resilient_reads_the_same_task_gradient_off_maces_weights_as_from_zero_leaves():
    """On MACE's own layers, with forces by autograd: ⟨H, P⊥W⟩ read as ∂J/∂γ less the host weights' gradient
    along P(W) equals the zero-leaf read, layer by layer (the two routes of ACE-resilient's consistency signal)."""
    import copy

    from equirelax.core.controllers.ace import ACE

    model, table = tiny_mace()
    batch = batch_of(table, field=[0.0, 0.0, 0.3])
    reads = []
    for route in ("host weights", "zero leaves"):
        relaxed = copy.deepcopy(model)
        torch.manual_seed(1)
        handle = equirelax.relax(relaxed, "ace-resilient", init="random", init_std=0.3, total_steps=10)
        controller = handle.controller
        assert all(controller.readers.values())
        if route == "zero leaves":
            controller.readers = dict.fromkeys(controller.readers)
            controller._choose_taps()
        out = relaxed(batch, training=True, compute_force=True)
        (((out["energy"] - batch["energy"]) ** 2).mean() + ((out["forces"] - batch["forces"]) ** 2).mean()).backward()
        reads.append({name: float(ACE._task_gradient(layer, controller.readers[name]))
                      for name, layer in handle.layers.items()})
    assert reads[0].keys() == reads[1].keys()
    # (the last product's linear maps scalars to scalars: every such map is equivariant, its read is 0)
    assert sum(value != 0.0 for value in reads[1].values()) == 3
    for name in reads[0]:
        assert reads[0][name] == pytest.approx(reads[1][name], rel=1e-6, abs=1e-12), name


def test_recm_gives_each_structure_of_a_mace_batch_to_one_probe_map_whatever_the_batch(probe_sides):
    """Every atom of a structure on one side in every relaxed layer, the same side when the structures come in
    another order (the host reshuffling its batches)."""
    model, table = tiny_mace()
    handle = equirelax.relax(model, "recm", total_steps=100)
    frames = emt_configurations(8, seed=0)
    split = []
    for order in (list(range(8)), [5, 2, 7, 0, 3, 6, 1, 4]):
        batch = mace_batch([frames[i] for i in order], table, cutoff=4.0)
        sides = probe_sides(handle, lambda: model(batch, training=True, compute_force=True), batch["batch"])
        split.append([{order[k]: side for k, side in per_layer.items()} for per_layer in sides.values()])
    first = split[0][0]
    assert all(per_layer == first for run in split for per_layer in run)
    assert 0 < sum(first.values()) < 8
