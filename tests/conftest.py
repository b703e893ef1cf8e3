import pytest
import torch

import equirelax  # noqa: F401  (imports e3nn safely in either host environment)
from equirelax.core._e3nn import o3
from equirelax.datasets.synthetic import gated_e3nn_model


@pytest.fixture(autouse=True)
def _float64_and_seed():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def model():
    return gated_e3nn_model()


def train(model, handle, x, y, steps, lr=1e-2, batch=64, epoch_every=None, seed=0, optimizer=None):
    """A plain PyTorch loop driven through handle.wrap; returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr)
    if handle is not None:
        handle.wrap(opt)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=generator)
        opt.zero_grad()
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if handle is not None and epoch_every and (step + 1) % epoch_every == 0:
            handle.epoch_end()
    return losses


def dense_matrix(linear):
    """The dense matrix of an e3nn o3.Linear (rows: outputs)."""
    eye = torch.eye(linear.irreps_in.dim)
    return linear(eye).T.detach()


def nbody_e3_error(model, inputs) -> float:
    """Largest deviation of an N-body model ``(h, x, v, edges, attr) → positions`` from E(3) equivariance, over
    3 random O(3) elements and a shift."""
    from equirelax.core.irreps import random_rotations

    h, x, v, edges, attr = inputs
    with torch.no_grad():
        reference = model(h, x, v, edges, attr)
        shift = torch.tensor([0.4, -1.0, 2.5])
        return max(float((model(h, x @ R.T + shift, v @ R.T, edges, attr) - (reference @ R.T + shift)).abs().max())
                   for R in random_rotations(3, "O3", dtype=x.dtype, generator=torch.Generator().manual_seed(1)))


__all__ = ["o3", "train", "dense_matrix", "nbody_e3_error"]


@pytest.fixture
def train_loop():
    return train


@pytest.fixture
def dense():
    return dense_matrix


@pytest.fixture
def e3_error():
    return nbody_e3_error
