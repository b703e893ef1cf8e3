"""RECM's two probe maps learn from disjoint halves of the samples: each sample's side is a hash of its own raw
input, the same in every epoch whatever batch it lands in, and reaches the probing layers through a forward
pre-hook that copies, pickles and exports leave inert or remove."""

import copy
import io

import pytest
import torch

import equirelax
from equirelax.core._e3nn import o3
from equirelax.core.handle import RelaxHandle
from equirelax.core.samples import SampleSplit, row_sides, structure_sides
from equirelax.datasets.synthetic import gated_e3nn_model, make_task


def _structures(count: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 10, (count,), generator=generator)
    return [3.0 * torch.randn(int(n), 3, generator=generator, dtype=torch.float64) for n in sizes]


def _batch_sides(structures, order, generator=None) -> dict:
    """Each structure's side in a batch of ``order`` (atoms shuffled within each structure when ``generator``)."""
    parts = [structures[i] if generator is None else structures[i][torch.randperm(len(structures[i]),
                                                                                   generator=generator)]
             for i in order]
    positions = torch.cat(parts)
    batch = torch.cat([torch.full((len(part),), k) for k, part in enumerate(parts)])
    sides = structure_sides(positions, batch)
    per_structure = [sides[batch == k] for k in range(len(parts))]
    assert all(bool(s.all()) or not bool(s.any()) for s in per_structure)  # every atom on its structure's side
    return {index: bool(s[0]) for index, s in zip(order, per_structure)}


def test_a_structure_keeps_its_side_whatever_its_batch_or_atom_order():
    structures = _structures(300)
    together = _batch_sides(structures, list(range(300)))
    generator = torch.Generator().manual_seed(1)
    shuffled = torch.randperm(300, generator=generator).tolist()
    apart = {}
    for start in range(0, 300, 7):  # other batch-mates, other atom order
        apart.update(_batch_sides(structures, shuffled[start:start + 7], generator))
    assert apart == together
    assert 0.4 < sum(together.values()) / 300 < 0.6  # about half the set on each side
    assert all(bool(structure_sides(structures[i]).all()) == together[i] for i in range(10))  # no batch vector
    float32 = _batch_sides([s.float() for s in structures], list(range(300)))
    assert 0.4 < sum(float32.values()) / 300 < 0.6


def test_a_plain_input_row_keeps_its_side_whatever_its_batch():
    x = torch.randn(500, 7, 4)
    sides = row_sides(x)
    assert sides.shape == (500,) and 0.4 < float(sides.float().mean()) < 0.6
    order = torch.randperm(500)
    assert torch.equal(row_sides(x[order]), sides[order])
    assert torch.equal(torch.cat([row_sides(x[i:i + 64]) for i in range(0, 500, 64)]), sides)


def _live_hooks(model):
    return [hook for module in model.modules() for hook in module._forward_pre_hooks.values()
            if isinstance(hook, SampleSplit)]


def test_probing_layers_get_each_training_batchs_sample_sides():
    model = gated_e3nn_model()
    handle = equirelax.relax(model, "recm", total_steps=100)
    (hook,) = _live_hooks(model)
    x, _ = make_task("symmetric", 32)
    for layer in handle.layers.values():
        layer.probing = True
    hook(model, (x,))
    assert all(len(layer.sample_sides) == 1 and torch.equal(layer.sample_sides[0], row_sides(x))
               for layer in handle.layers.values())
    model(x)  # each forward takes the sides it was given, and only those
    assert all(layer.sample_sides == () for layer in handle.layers.values())
    model.eval()
    hook(model, (x,))  # evaluation never probes
    assert all(layer.sample_sides == () for layer in handle.layers.values())
    assert not _live_hooks(equirelax.relax(gated_e3nn_model(), "ace", total_steps=100).model)


def test_copies_hold_an_inert_hook_and_export_removes_it():
    model = gated_e3nn_model()
    equirelax.relax(model, "recm", total_steps=100)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        (inert,) = _live_hooks(other)
        assert inert.layers == []
        handle = RelaxHandle.attach(other)
        (live,) = _live_hooks(other)  # re-attached: one hook, driving the copy's own layers
        assert [id(layer) for layer in live.layers] == [id(layer) for layer in handle.layers.values()]
    for mode in ("merge", "freeze"):
        exported = equirelax.export(copy.deepcopy(model), mode)
        assert not _live_hooks(exported)


@pytest.mark.parametrize("leading", [(64,), (10, 7)])
def test_each_probe_map_learns_only_from_its_own_samples(leading):
    """Through the model (the hook): V_a's gradient is the loss's on V_a's samples' rows alone, V_b's on the
    others', whatever rows a sample has (a sample's rows are every index after the first)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(o3.Linear("8x0e+4x1o", "6x0e+3x1o").to(torch.float64))
    handle = equirelax.relax(model, "recm", total_steps=100)
    (layer,) = handle.layers.values()
    with torch.no_grad():
        layer.probe_B.normal_()
    x = torch.randn(*leading, 20, dtype=torch.float64)
    sides = row_sides(x)
    assert 0 < int(sides.sum()) < leading[0]
    weights = torch.randn(*leading, 15, dtype=torch.float64)  # a loss linear in the output
    layer.probing = True
    grads = torch.autograd.grad((model(x) * weights).sum(), layer.probe_leaves)
    for key, mine in ((0, ~sides), (1, sides)):  # the other side's samples change nothing in this map's gradient
        layer.probing = True
        alone = torch.autograd.grad((model(x[mine]) * weights[mine]).sum(), layer.probe_leaves)
        # (the maps act in units of c = rms(f_eq x)/rms(x), a property of the batch: compare directions)
        assert torch.allclose(grads[1][key] / grads[1][key].norm(), alone[1][key] / alone[1][key].norm(),
                              atol=1e-9)
        assert float(alone[1][1 - key].norm()) == 0.0


def test_sample_ids_set_on_the_handle_group_the_rows_of_each_sample(probe_sides):
    """Systems batched without a structure index (an EGNN's nodes): ids given with ``handle.set_samples`` put
    every row of a sample on one side, the same whatever batch it comes in."""
    model = torch.nn.Sequential(o3.Linear("4x0e+2x1o", "4x0e+2x1o"))
    handle = equirelax.relax(model, "recm", total_steps=100)
    systems = torch.arange(40)
    split = []
    for order in (systems, systems.flip(0)):
        ids = order.repeat_interleave(5)  # 5 rows per system
        handle.set_samples(ids)
        sides = probe_sides(handle, lambda: model(torch.randn(200, 10)), ids)
        split.append(sides["0"])
    assert split[0] == split[1] and 0 < sum(split[0].values()) < 40
    handle.set_samples(None)  # back to the inputs' own rows
    x = torch.randn(200, 10)
    assert probe_sides(handle, lambda: model(x), torch.arange(200))["0"] == dict(enumerate(row_sides(x).tolist()))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        handle.set_samples(torch.zeros(10))
    equirelax.relax(gated_e3nn_model(), "ace", total_steps=10).set_samples(torch.arange(5))  # no probes: no-op


def test_a_saved_model_runs_the_hooks_registered_where_it_is_loaded():
    """A pickled model keeps its hooks' ids and a new process numbers its own hooks from 0 again: a hook
    registered there under the saved one's id is called as registered (e3nn's ``set_irreps_debug`` hooks
    take no kwargs)."""
    from torch.utils.hooks import RemovableHandle

    model = gated_e3nn_model()
    equirelax.relax(model, "recm", total_steps=100)
    (saved_id,) = [key for key, hook in model._forward_pre_hooks.items() if isinstance(hook, SampleSplit)]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    calls = []
    next_id = RemovableHandle.next_id
    RemovableHandle.next_id = saved_id  # as in the process that loads it
    try:
        loaded.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    finally:
        RemovableHandle.next_id = max(next_id, RemovableHandle.next_id)
    loaded.train()(make_task("symmetric", 8)[0])
    assert calls == [1]


@pytest.mark.parametrize("ids", [True, False])
def test_a_layer_whose_rows_are_edges_gives_each_edge_its_senders_side(probe_sides, ids):
    """The steerable N-body model's message tensor products act on edges, its linears on nodes: with the
    systems' ids from the loop every row of a system is on one side in both kinds of layer; without, every
    edge is on its sender's side."""
    pytest.importorskip("torch_geometric")  # (nbody_graph lives with the EGNN model)
    from equirelax.datasets.nbody import charged_nbody
    from equirelax.models.egnn import nbody_graph
    from equirelax.models.steerable_nbody import SteerableNBody

    data = charged_nbody(12, seed=0)
    h, x, v, edges, attr = nbody_graph(data.positions, data.velocities, data.charges, True)
    model = SteerableNBody("8x0e + 4x1o", layers=2, hidden=8)
    handle = equirelax.relax(model, "recm", total_steps=100)
    messages = [name for name in handle.layers if "message" in name]
    assert messages and len(messages) < len(handle.layers)
    system = torch.arange(12).repeat_interleave(5)
    if ids:
        handle.set_samples(system)
        sides = probe_sides(handle, lambda: model(h, x, v, edges, attr), (system, system[edges[0]]))
        assert len({tuple(per_layer.items()) for per_layer in sides.values()}) == 1  # one split, every layer
    else:
        node = torch.arange(60)
        sides = probe_sides(handle, lambda: model(h, x, v, edges, attr), (node, edges[0]))
        assert all(sides[name] == sides["embedding"] for name in messages)
