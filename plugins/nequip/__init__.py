"""NequIP host: relax a NequIP model inside ``nequip-train`` from its own Hydra config, and NequIP for the tools.

    training.py  ``RelaxedModel``, ``ExportedModel``, ``EquirelaxCallback`` and checkpoint export
    config.py    ``nequip-train`` config builders (the equirelax entries, a small config for generated data)
    host.py      how compare trains and evaluates a NequIP config, and how pretrain and export run
"""

# Loaded on first use, so that the tools can reach ``host`` in an environment without NequIP (and Lightning).
_TRAINING = ("CHECKPOINT_KEY", "EquirelaxCallback", "ExportedModel", "RelaxedModel", "export_checkpoint",
             "load_checkpoint_models", "relaxed_handles")


def __getattr__(name):
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_TRAINING)
