"""NequIP model builders for ``training_module.model``: ``RelaxedModel`` (a NequIP model, relaxed) and
``ExportedModel`` (a relaxed one, exported back to NequIP's own classes)."""

from __future__ import annotations

import torch

from ...core.handle import RelaxHandle
from ...core.layer import RelaxedLayer
from ...core.patching import export, relax
from .config import RELAX_KEYS

def _submodels(model) -> dict:
    """``{name: GraphModel}``: NequIP keeps one model or a ``ModuleDict`` of them."""
    if isinstance(model, torch.nn.ModuleDict):
        return dict(model.items())
    return {"": model}


def _build(config):
    from hydra.utils import get_method  # NequIP's own builders avoid hydra.instantiate the same way

    if isinstance(config, torch.nn.Module):
        return config
    if not isinstance(config, dict) or "_target_" not in config:
        raise ValueError(
            "equirelax: RelaxedModel needs the model to relax under 'model', as a NequIP model config with a "
            f"'_target_' (e.g. nequip.model.NequIPGNNModel or nequip.model.ModelFromCheckpoint), got {config!r}"
        )
    config = dict(config)
    return get_method(config.pop("_target_"))(**config)


def _packaging() -> bool:
    """Whether ``nequip-package`` is building this model; the relaxed model is then packaged frozen."""
    try:
        from nequip.scripts._workflow_utils import get_workflow_state
    except ImportError:  # pragma: no cover - other nequip versions
        return False
    return get_workflow_state() == "package"


def _freeze_for_package(built):
    """``nequip-package`` of a relaxed checkpoint: each relaxed layer frozen (``export(mode="freeze")``: γ and
    branches kept, plain torch parts, the checkpoint's weights load into it), and the one module that defines the
    frozen layers interned, so the package runs where equirelax is not installed."""
    from nequip.scripts import _package_utils

    for graph_model in _submodels(built).values():
        export(graph_model, "freeze")
    _package_utils._INTERNAL_MODULES.add(FROZEN_MODULE)
    return built


FROZEN_MODULE = "equirelax.core.frozen"


DRIVEN = "_equirelax_driven"  # set on a relaxed model by EquirelaxCallback


class _ControllerGuard:
    """Gradient hook on a relaxed model's branch: training it with no EquirelaxCallback would leave γ where it
    starts, train the branches unconstrained and export nothing, so the first backward into the branches stops.
    (Forces by autograd, in any mode, never put a gradient on the branch weights.)"""

    def __init__(self, model):
        self.model = model

    def __call__(self, parameter):
        if not getattr(self.model, DRIVEN, False):
            raise RuntimeError(
                "equirelax: the model has relaxed layers (RelaxedModel) but no controller drives them: add "
                "`- _target_: equirelax.plugins.nequip.EquirelaxCallback` to trainer.callbacks (without it γ "
                "never moves, the branches train unconstrained and no exported model is written)"
            )


def RelaxedModel(
    model,
    controller: str = "ace",
    targets=None,
    branch: str = "lowrank",
    rank: int | None = None,
    init: str = "zero",
    init_std: float = 1e-2,
    group: str = "O3",
    on_nonfinite: str = "warn",
    options: dict | None = None,
    seed: int | None = None,
    **model_kwargs,
):
    """NequIP model builder: the model built from ``model`` (a config with ``_target_``), relaxed.

    Takes the keyword arguments of :func:`equirelax.relax`; ``options`` are the
    controller's. CR's ``epochs`` defaults to the trainer's ``max_epochs``.
    Random branch initialisation is seeded by ``seed`` (default: the inner
    model's ``seed``), so every rank of a distributed run builds the same model.
    Other keyword arguments (those NequIP's tools set on a model builder, e.g.
    ``model_dtype``, ``compile_mode``) go to the inner model.
    """
    from ...core.settings import validate_relax_settings

    validate_relax_settings({"controller": controller, "targets": targets, "branch": branch, "rank": rank,
                             "init": init, "init_std": init_std, "group": group, "on_nonfinite": on_nonfinite,
                             "options": {} if options is None else options, "seed": seed}, keys=RELAX_KEYS)
    if model_kwargs:
        if not isinstance(model, dict):
            raise TypeError(f"equirelax: RelaxedModel got unknown argument(s) {sorted(model_kwargs)}")
        model = {**model, **model_kwargs}
    options = dict(options or {})
    epochs_from_trainer = controller == "cr" and options.get("schedule", "triangular") != "constant" \
        and "epochs" not in options
    if epochs_from_trainer:
        options["epochs"] = 1  # set from trainer.max_epochs by EquirelaxCallback
    built = _build(model)
    if seed is None:
        seed = model.get("seed", 0) if isinstance(model, dict) else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for name, graph_model in _submodels(built).items():
            handle = relax(graph_model, controller, targets, branch, adapter="nequip", init=init, init_std=init_std,
                           group=group, on_nonfinite=on_nonfinite, rank=rank, **options)
            handle.config["epochs_from_trainer"] = epochs_from_trainer
            for layer in handle.layers.values():
                layer.relax_config["epochs_from_trainer"] = epochs_from_trainer
            first = next(iter(handle.layers.values()))
            next(first.branch.parameters()).register_post_accumulate_grad_hook(_ControllerGuard(graph_model))
    return _freeze_for_package(built) if _packaging() else built


def ExportedModel(model, mode: str = "merge", **model_kwargs):
    """NequIP model builder: a relaxed model, exported to NequIP's own classes (branches merged or dropped).

    ``model`` is a ``RelaxedModel`` config or a ``ModelFromCheckpoint`` of a
    relaxed checkpoint; other keyword arguments go to it, as for ``RelaxedModel``.
    """
    if model_kwargs:
        model = {**model, **model_kwargs}
    built = _build(model)
    for graph_model in _submodels(built).values():
        export(graph_model, mode)
    return built


def relaxed_handles(model) -> dict:
    """``{model name: RelaxHandle}`` for every relaxed sub-model of a NequIP training module's ``model``."""
    handles = {}
    for name, graph_model in _submodels(model).items():
        if any(isinstance(m, RelaxedLayer) for m in graph_model.modules()):
            handles[name] = RelaxHandle.attach(graph_model)
    return handles
