"""The SEGNN-style e3nn N-body model: E(3)-equivariant as built, relaxed by the e3nn adapter on its own layers,
bit-identical with the branches off, and exactly equivariant again after export (both e3nn versions)."""

import pytest
import torch

import equirelax
from equirelax.datasets.nbody import charged_nbody, nbody_graph
from equirelax.models.steerable_nbody import SteerableNBody

LINEARS = ["embedding", "blocks.0.update", "blocks.1.update", "output"]


@pytest.fixture
def graph():
    data = charged_nbody(5, seed=0, start=100, horizon=100, field=[0.0, 0.0, 1.0])
    return nbody_graph(data.positions, data.velocities, data.charges, node_charges=True)


def _model():
    torch.manual_seed(0)
    return SteerableNBody("8x0e + 4x1o", layers=2, hidden=8)


def test_graph_carries_the_charges_as_node_scalars_on_request():
    data = charged_nbody(2, seed=0, start=10, horizon=10)
    plain = nbody_graph(data.positions, data.velocities, data.charges)
    charged = nbody_graph(data.positions, data.velocities, data.charges, node_charges=True)
    assert plain[0].shape == (10, 1) and charged[0].shape == (10, 2)
    assert torch.equal(charged[0][:, :1], plain[0])
    assert torch.equal(charged[0][:, 1], torch.as_tensor(data.charges.reshape(-1)))


def test_model_is_e3_equivariant(graph, e3_error):
    assert e3_error(_model(), graph) < 1e-10


def test_model_rejects_hidden_irreps_without_even_scalars():
    with pytest.raises(ValueError, match="even scalars"):
        SteerableNBody("8x0o + 4x1o")


def test_default_targets_are_its_linears_and_message_products(graph):
    handle = equirelax.relax(_model(), "fixed")
    assert set(handle.levels()) == set(LINEARS) | {"blocks.0.message", "blocks.1.message"}


def test_relaxed_model_with_branches_off_is_the_host_model_bit_for_bit(graph):
    base = _model()
    expected = base(*graph)
    model = _model()
    handle = equirelax.relax(model, "fixed", init="random")
    assert not torch.equal(model(*graph), expected)
    with handle.equivariant():
        assert torch.equal(model(*graph), expected)


def test_relaxed_breaks_symmetry_and_export_restores_it(graph, e3_error):
    model = _model()
    equirelax.relax(model, "fixed", init="random", init_std=0.1)
    assert e3_error(model, graph) > 1e-3
    with pytest.warns(UserWarning, match="could not merge"):  # tensor-product branches are dropped
        equirelax.export(model)
    assert e3_error(model, graph) < 1e-10
    assert not any(type(m).__module__.startswith("equirelax.core") for m in model.modules())


def test_export_merges_the_equivariant_part_of_linear_branches(graph):
    model = _model()
    handle = equirelax.relax(model, "fixed", targets=LINEARS, init="random", init_std=0.1)
    with handle.projected():
        projected = model(*graph)
    with handle.equivariant():
        plain = model(*graph)
    equirelax.export(model)
    exported = model(*graph)
    assert torch.allclose(exported, projected, atol=1e-12)
    assert not torch.allclose(exported, plain, atol=1e-6)  # the merge kept what the branches learned


def test_field_input_model_is_equivariant_with_the_field_and_symmetric_about_it_without(graph):
    from equirelax.core.irreps import random_rotations

    torch.manual_seed(0)
    field = torch.tensor([0.0, 0.0, 1.0])
    model = SteerableNBody("8x0e + 4x1o", layers=2, hidden=8, field=field)
    h, x, v, edges, attr = graph
    reference = model(h, x, v, edges, attr)
    R = next(iter(random_rotations(1, "SO3", dtype=x.dtype, generator=torch.Generator().manual_seed(1))))
    model.field.copy_(R @ field)  # the field rotated with the system: equivariant
    assert torch.allclose(model(h, x @ R.T, v @ R.T, edges, attr), reference @ R.T, atol=1e-10)
    model.field.copy_(field)  # the field fixed: a rotation about it is a symmetry, another is not
    about = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=x.dtype)
    assert torch.allclose(model(h, x @ about.T, v @ about.T, edges, attr), reference @ about.T, atol=1e-10)
    assert not torch.allclose(model(h, x @ R.T, v @ R.T, edges, attr), reference @ R.T, atol=1e-3)
    assert not torch.allclose(reference, SteerableNBody("8x0e + 4x1o", layers=2, hidden=8)(h, x, v, edges, attr))
