"""``equirelax-mace-train`` on MACE's own ``--distributed`` path (torchrun, gloo, 2 CPU processes): both ranks end
with bit-identical weights, γ and controller statistics, and rank 0 alone writes the exported model."""

import os
from pathlib import Path

import pytest

pytest.importorskip("mace")

import torch  # noqa: E402
import yaml  # noqa: E402

from equirelax.datasets.emt import write_emt_dataset  # noqa: E402

HERE = Path(__file__).parent
CASES = {"recm": {}, "cr": {"reg_weight": 0.1}, "ace-resilient": {}}
CONFIG = {
    "name": "ddp", "seed": 3, "train_file": "train.xyz", "valid_fraction": 0.2, "E0s": "average", "model": "MACE",
    "hidden_irreps": "8x0e + 8x1o", "r_max": 4.0, "num_radial_basis": 4, "num_cutoff_basis": 3, "max_L": 1,
    "correlation": 2, "num_interactions": 2, "batch_size": 2, "valid_batch_size": 4, "max_num_epochs": 2,
    "device": "cpu", "default_dtype": "float64", "eval_interval": 1, "distributed": True, "launcher": "torchrun",
}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, torchrun):
    root = tmp_path_factory.mktemp("mace_ddp")
    write_emt_dataset(root / "train.xyz", 25, seed=0, field=[0.0, 0.0, 0.3])
    runs = {}
    for controller, options in CASES.items():
        directory = root / controller
        directory.mkdir()
        config = {**CONFIG, "train_file": str(root / "train.xyz"),
                  "relax": {"controller": controller, "options": options, "init": "random"}}
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        torchrun([str(HERE / "mace_rank_state.py"), str(directory), "--config", "config.yaml"],
                 cwd=directory, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[controller] = directory, [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return runs


@pytest.mark.parametrize("controller", list(CASES))
def test_every_rank_holds_identical_weights_and_controller_state(ddp_runs, controller):
    directory, (rank0, rank1) = ddp_runs[controller]
    assert rank0.keys() == rank1.keys()
    different = [key for key in rank0 if not torch.equal(rank0[key], rank1[key])]
    assert not different, different
    gammas = {k: float(v) for k, v in rank0.items() if k.endswith(".gamma")}
    assert len(gammas) == 4 and [k for k in rank0 if ".ctrl_" in k]
    if controller == "recm":
        assert all(g < 0.99 for g in gammas.values())
    exported = torch.load(directory / "ddp.model", weights_only=False)
    assert not any(type(m).__module__.startswith("equirelax") for m in exported.modules())
