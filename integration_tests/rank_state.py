"""A Lightning callback for the data-parallel tests: every rank saves its model state (weights, γ and
controller buffers) at the end of training, so the test can compare the ranks."""

import os

import torch
from lightning.pytorch.callbacks import Callback


class SaveRankState(Callback):
    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))
