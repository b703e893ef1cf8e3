"""MACE host: ``equirelax-mace-train`` (MACE's own training with a relaxed model) and MACE for the tools.

    training.py  the ``relax:`` settings and the hooks into ``mace_run_train``
    host.py      how compare trains and evaluates a MACE config, and how pretrain runs
"""

from .training import (
    CHECKPOINT_KEY,
    EXPORT_MODES,
    RELAX_KEYS,
    MaceSession,
    RelaxConfigError,
    distributed_setup,
    main,
    split_relax_config,
    validate_relax_config,
)

__all__ = ["CHECKPOINT_KEY", "EXPORT_MODES", "RELAX_KEYS", "MaceSession", "RelaxConfigError", "distributed_setup",
           "main", "split_relax_config", "validate_relax_config"]
