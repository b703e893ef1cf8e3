"""One training run of ``equirelax compare``, in its own process: the host's own CLI, plus
training time per epoch and peak memory, which compare reads back.

    python -m equirelax.plugins.compare_child mace|nequip RUN_DIR [host arguments ...]

writes RUN_DIR/resources.json (peak memory) and, for MACE, RUN_DIR/epochs.json
(NequIP runs get ``NequipEpochTimer`` in their config, which writes the same file).

The timing brackets the host's training pass of each epoch (not validation), so
vanilla and relaxed runs are timed the same way.
"""

from __future__ import annotations

import json
import resource
import sys
import time


class EpochTimer:
    """Training seconds of each epoch, written to ``path`` after every epoch."""

    def __init__(self, path: str):
        self.path = path
        self.seconds: list[float] = []
        self.best_checkpoint = None
        self._start = None

    def start(self):
        self._start = time.perf_counter()

    def stop(self):
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None
            self.write()

    def write(self):
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump({"epoch_seconds": self.seconds, "best_checkpoint": self.best_checkpoint}, handle)


def _lightning_callback_base():
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError:  # the MACE environment has no Lightning; NequIP configs only ever ask for it there
        return object
    return Callback


class NequipEpochTimer(_lightning_callback_base()):
    """Lightning callback for compare's NequIP runs: times the training pass of each epoch and
    records which checkpoint the run's checkpoint callback considers best."""

    def __init__(self, path: str):
        super().__init__()
        self.timer = EpochTimer(path)

    def on_train_epoch_start(self, trainer, pl_module):
        self.timer.start()

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.timer.stop()

    def on_train_epoch_end(self, trainer, pl_module):
        self.timer.stop()

    def on_train_end(self, trainer, pl_module):
        callback = trainer.checkpoint_callback
        if callback is not None and callback.best_model_path:
            self.timer.best_checkpoint = callback.best_model_path
        self.timer.write()


def _run_mace(timing_path: str, args: list[str]) -> None:
    import mace  # noqa: F401
    import mace.tools as tools

    from . import mace as mace_plugin

    train_module = sys.modules["mace.tools.train"]
    timer = EpochTimer(timing_path)
    original_train = tools.train

    def timed_train(*a, **k):
        inner = train_module.train_one_epoch  # already wrapped by the relax session when there is one

        def train_one_epoch(*a2, **k2):
            timer.start()
            try:
                return inner(*a2, **k2)
            finally:
                timer.stop()

        train_module.train_one_epoch = train_one_epoch
        try:
            return original_train(*a, **k)
        finally:
            train_module.train_one_epoch = inner

    tools.train = timed_train
    mace_plugin.main(args)


def _run_nequip(args: list[str]) -> None:
    from nequip.scripts.train import main

    sys.argv = ["nequip-train", *args]
    main()


def _write_resources(path: str) -> None:
    import torch

    record = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "peak_gpu_mb": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def main(argv=None) -> None:
    import os

    host, run_dir, *args = sys.argv[1:] if argv is None else argv
    try:
        if host == "mace":
            _run_mace(os.path.join(run_dir, "epochs.json"), args)
        elif host == "nequip":
            _run_nequip(args)
        else:
            sys.exit(f"equirelax: unknown host {host!r}")
    finally:
        _write_resources(os.path.join(run_dir, "resources.json"))


if __name__ == "__main__":
    main()
