"""``nequip-train`` under Lightning DDP (torchrun, gloo, 2 CPU processes) with a relaxed model: both ranks end
with bit-identical weights, γ and controller statistics (RECM's probe gradients and CR's regulariser are
computed from each rank's own batch and reduced over the ranks). DDP itself broadcasts rank 0's buffers at every
forward, so what the reduction adds for RECM (statistics of the global batch, not of rank 0's share) is checked
against a single process in tests/test_distributed.py."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("nequip")

import torch  # noqa: E402

from equirelax.datasets.emt import write_emt_dataset  # noqa: E402
from equirelax.plugins.nequip.config import model_config, training_config, write_config  # noqa: E402

CASES = {"recm": {}, "cr": {"reg_weight": 0.1}, "ace-resilient": {}}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, torchrun):
    root = tmp_path_factory.mktemp("nequip_ddp")
    write_emt_dataset(root / "train.xyz", 25, seed=0, field=[0.0, 0.0, 0.3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    runs = {}
    for controller, options in CASES.items():
        directory = root / controller
        directory.mkdir()
        config = training_config(
            str(root / "train.xyz"), model=model_config(num_features=8), epochs=2, batch_size=2,
            relax={"controller": controller, "options": options, "init": "random"},
            callbacks=[{"_target_": "rank_state.SaveRankState", "directory": str(directory)}],
        )
        # RECM's probing steps leave the branches out of the graph
        config["trainer"].update(devices=2, strategy="ddp_find_unused_parameters_true" if controller == "recm"
                                 else "ddp")
        write_config(directory, "config", config)
        torchrun([str(Path(sys.executable).parent / "nequip-train"), "-cp", str(directory), "-cn", "config",
                  f"hydra.run.dir={directory / 'out'}"], cwd=directory, env=env)
        runs[controller] = [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return runs


@pytest.mark.parametrize("controller", list(CASES))
def test_every_rank_holds_identical_weights_and_controller_state(ddp_runs, controller):
    rank0, rank1 = ddp_runs[controller]
    assert rank0.keys() == rank1.keys()
    different = [key for key in rank0 if not torch.equal(rank0[key], rank1[key])]
    assert not different, different
    gammas = {k: float(v) for k, v in rank0.items() if k.endswith(".gamma")}
    assert len(gammas) == 4
    controller_state = [k for k in rank0 if ".ctrl_" in k]
    assert controller_state  # γ, λ / slack / RECM statistics all compared above
    if controller == "recm":
        assert all(g < 0.99 for g in gammas.values())  # RECM moved γ: its reduced statistics were used
        assert all(float(rank0[k.replace(".gamma", ".ctrl_gap_weight")]) > 0 for k in gammas)  # it probed
    if controller == "cr":
        assert len(set(gammas.values())) == 1
