"""MACE host: ``equirelax-mace-train`` (MACE's own training with a relaxed model) and MACE for the tools.

    config.py    the ``relax:`` settings, taken out of MACE's arguments and checked
    training.py  the hooks into ``mace_run_train``: relax, controller, logs, checkpoints, export
    host.py      how compare trains and evaluates a MACE config, and how pretrain runs
"""

from .config import EXPORT_MODES, RELAX_KEYS, RelaxConfigError, split_relax_config, validate_relax_config
from .training import CHECKPOINT_KEY, MaceSession, distributed_setup, main

__all__ = ["CHECKPOINT_KEY", "EXPORT_MODES", "RELAX_KEYS", "MaceSession", "RelaxConfigError", "distributed_setup",
           "main", "split_relax_config", "validate_relax_config"]
