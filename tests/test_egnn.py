"""The EGNN model and its adapter: E(3)-equivariant as built, bit-identical at γ = 0, relaxed by raw-coordinate
branches, and plain EGNN again after export."""

import pytest
import torch

pytest.importorskip("torch_geometric")

import equirelax  # noqa: E402
from equirelax.models.egnn import EGNN, nbody_graph  # noqa: E402
from equirelax.datasets.nbody import charged_nbody  # noqa: E402


@pytest.fixture(scope="module")
def graph():
    data = charged_nbody(6, seed=0, start=100, horizon=100, field=[0.0, 0.0, 1.0])
    inputs = nbody_graph(data.positions, data.velocities, data.charges)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)  # the tests run in float64
    return inputs, torch.as_tensor(data.targets, dtype=torch.float64)


def _egnn():
    torch.manual_seed(0)
    return EGNN(hidden=16, layers=2)


def test_egnn_is_e3_equivariant(graph, e3_error):
    assert e3_error(_egnn(), graph[0]) < 1e-12


@pytest.mark.parametrize("branch", ["linear", "mlp"])
def test_gamma_zero_is_egnn_bit_for_bit_and_a_random_branch_breaks_symmetry(graph, branch, e3_error):
    (h, x, v, edges, attr), _ = graph
    model = _egnn()
    reference = model(h, x, v, edges, attr)
    handle = equirelax.relax(model, "fixed", branch=branch, init="random", init_std=0.5, gamma=0.0)
    assert sorted(handle.layers) == ["blocks.0.coordinate_update", "blocks.1.coordinate_update"]
    assert torch.equal(model(h, x, v, edges, attr), reference)
    for layer in handle.layers.values():
        layer.gamma.fill_(1.0)
    assert not torch.allclose(model(h, x, v, edges, attr), reference)
    assert e3_error(model, graph[0]) > 1e-3  # the branch sees raw coordinates and velocities
    with pytest.warns(UserWarning, match="dropped"):
        equirelax.export(model)
    assert torch.equal(model(h, x, v, edges, attr), reference)
    assert not any(type(m).__module__.startswith("equirelax.core") for m in model.modules())


@pytest.mark.parametrize("controller,options", [("recm", {"probe_every": 2}), ("ace-resilient", {}),
                                                ("cr", {"epochs": 4})])
def test_relaxed_egnn_trains_on_nbody_data(graph, controller, options):
    (h, x, v, edges, attr), targets = graph
    model = _egnn()
    handle = equirelax.relax(model, controller, branch="mlp", total_steps=100, **options)
    optimizer = handle.wrap(torch.optim.Adam(model.parameters(), lr=5e-3))
    losses = []
    for epoch in range(4):
        for _ in range(25):
            optimizer.zero_grad()
            loss = (model(h, x, v, edges, attr) - targets.reshape(-1, 3)).pow(2).mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        handle.epoch_end()
    assert losses[-1] < 0.5 * losses[0]
    assert all(0.0 <= g <= 1.0 + 1e-6 for g in handle.levels().values())
