"""NequIP host: relax a NequIP model inside ``nequip-train`` from its own Hydra config, and NequIP for the tools.

    model.py     ``RelaxedModel`` and ``ExportedModel``, the model builders for ``training_module.model``
    training.py  ``EquirelaxCallback`` (the controller in Lightning's loop) and checkpoint export
    config.py    ``nequip-train`` config builders (the equirelax entries, a small config for generated data)
    host.py      how compare trains and evaluates a NequIP config, and how pretrain and export run
"""

# Loaded on first use, so that the tools can reach ``host`` in an environment without NequIP (and Lightning).
_FROM = {"RelaxedModel": "model", "ExportedModel": "model", "relaxed_handles": "model",
         "EquirelaxCallback": "training", "CHECKPOINT_KEY": "training", "export_checkpoint": "training",
         "load_checkpoint_models": "training"}


def __getattr__(name):
    if name in _FROM:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_FROM)
