"""Data-parallel training (torchrun, DDP, gloo, 2 processes on CPU): every rank holds bit-identical controller
state and weights, equal to a single process training on the same global batches."""

import importlib.util
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def _flatten(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}/{key}")
    elif torch.is_tensor(node):
        yield prefix, node


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, torchrun):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(WORKER), str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("controller,options", worker.CONTROLLERS)
@pytest.mark.parametrize("branch", worker.BRANCHES)
def test_ranks_hold_identical_state_equal_to_one_process(ranks, controller, options, branch):
    rank0, rank1 = ranks
    key = worker.label(controller, options, branch)
    a, b = dict(_flatten(rank0[key])), dict(_flatten(rank1[key]))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between ranks"
    single = dict(_flatten(worker.train(controller, options, branch)))
    assert single.keys() == a.keys()
    if controller == "recm":
        return  # RECM's probe maps each take one half of a rank's own rows: not the halves of the global batch
    for name, value in single.items():
        tolerance = 1e-7  # float64; RECM takes square roots of small differences
        assert torch.allclose(a[name].double(), value.double(), atol=tolerance, rtol=tolerance), name
    gammas = [float(v) for n, v in a.items() if n.startswith("/controller/layer_state") and n.endswith("/gamma")]
    assert len(gammas) == 2
    if controller in ("ace", "ace-resilient", "recm"):
        assert all(g != 1.0 for g in gammas)  # the controller moved γ, so the comparison means something
