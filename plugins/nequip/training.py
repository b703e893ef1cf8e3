"""NequIP integration: relax a NequIP model inside ``nequip-train``, from its own Hydra config.

Two ``_target_`` entries in an existing config turn it on::

    training_module:
      model:
        _target_: equirelax.plugins.nequip.RelaxedModel
        controller: ace               # fixed | cr | ace | ace-resilient | recm | entry-point name
        options: {}                   # controller options
        model:                        # the model as it was: NequIPGNNModel, ModelFromCheckpoint, ModelFromPackage ...
          _target_: nequip.model.NequIPGNNModel
          ...
    trainer:
      callbacks:
        - _target_: equirelax.plugins.nequip.EquirelaxCallback

``RelaxedModel`` builds the inner model exactly as NequIP would and patches it
(branches start at zero: step-0 predictions are unchanged). The callback runs
the controller from Lightning's hooks (after backward, after the optimizer
step, at epoch end), logs γ per layer, the controller's λ/gap and the
equivariance error through the config's Lightning logger, stores the relax
signature in each checkpoint, and at the end writes ``exported.ckpt``: a plain
NequIP checkpoint (branches merged or dropped) for ``nequip-package``,
``nequip-compile``, ``ModelFromCheckpoint`` and the ASE calculator, with no
equirelax needed to load it. ``equirelax export --host nequip IN OUT`` does the
same for any relaxed checkpoint. The model builders are in ``model.py``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import tempfile
import warnings

import torch

from ...core.controllers import check_schedule_fits
from ...core.handle import RelaxHandle
from ...core.patching import EXPORT_MODES, export
from .config import RELAXED_MODEL_TARGET as TARGET
from .model import DRIVEN, _submodels, relaxed_handles

CHECKPOINT_KEY = "equirelax"
_log = logging.getLogger(__name__)


def _set_cr_epochs(handle: RelaxHandle, max_epochs):
    if not handle.config.get("epochs_from_trainer", False):
        if handle.controller.name == "cr":
            check_schedule_fits(handle.controller.options.get("epochs"), max_epochs, "the trainer", "max_epochs")
        return
    if max_epochs is None or max_epochs <= 0:
        raise ValueError("equirelax: the cr schedule needs a finite trainer.max_epochs, or options.epochs in the "
                         "RelaxedModel config")
    handle.controller.options["epochs"] = int(max_epochs)
    for layer in handle.layers.values():
        layer.relax_config["options"]["epochs"] = int(max_epochs)


def _lightning_callback_base():
    import lightning

    return lightning.Callback


class EquirelaxCallback(_lightning_callback_base()):
    """Runs the controller of every relaxed model inside NequIP's Lightning training.

    Args:
        export: ``merge`` (default), ``drop`` or ``none``: the exported plain
            NequIP checkpoint written when training ends.
        export_path: where to write it (default ``exported.ckpt`` next to the
            checkpoints of the first ``ModelCheckpoint`` callback).
        export_from: ``best`` (the monitored checkpoint NequIP also tests, when
            there is one) or ``last`` (the weights at the end of training).
        equivariance_check: log the equivariance error of energy and forces on
            the first validation batch of each validation run.
    """

    def __init__(self, export: str = "merge", export_path: str | None = None, export_from: str = "best",
                 equivariance_check: bool = True):
        super().__init__()
        if export not in (*EXPORT_MODES, "none"):
            raise ValueError(f"equirelax: EquirelaxCallback export must be one of {(*EXPORT_MODES, 'none')}, "
                             f"got {export!r}")
        if export_from not in ("best", "last"):
            raise ValueError(f"equirelax: export_from must be 'best' or 'last', got {export_from!r}")
        self.export = export
        self.export_path = export_path
        self.export_from = export_from
        self.equivariance_check = equivariance_check
        self.handles: dict = {}
        self._hooks = []
        self._equivariance = None
        self._exported_test = None
        self.exported_path = None

    # ---------------------------------------------------------------- set-up
    def setup(self, trainer, pl_module, stage):
        self.handles = relaxed_handles(pl_module.model)
        if not self.handles and stage == "fit":
            raise ValueError(
                "equirelax: EquirelaxCallback found no relaxed layer in the model; put the model config under "
                f"training_module.model with _target_: {TARGET}"
            )

    def on_train_start(self, trainer, pl_module):
        self.handles = relaxed_handles(pl_module.model)
        for graph_model in _submodels(pl_module.model).values():
            setattr(graph_model, DRIVEN, True)
        stepping = trainer.estimated_stepping_batches  # optimizer steps of the whole run (Lightning's estimate)
        total_steps = int(stepping) if stepping not in (None, float("inf")) and stepping > 0 else None
        for handle in self.handles.values():
            _set_cr_epochs(handle, trainer.max_epochs)
            handle.set_total_steps(total_steps)
            handle.resync()  # a resumed run's γ, λ and statistics came back with the weights
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        if trainer.is_global_zero:
            for model_name, handle in self.handles.items():
                where = f" in {model_name}" if len(self.handles) > 1 else ""
                _log.info(f"equirelax: relaxed {list(handle.short_names().values())}{where} with controller "
                          f"{handle.controller.name!r} {handle.controller.options}, over {total_steps} optimizer steps")

    def _remove_hooks(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # --------------------------------------------------------------- per step
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for handle in self.handles.values():
            handle.after_backward()

    def _after_step(self, optimizer, args, kwargs):
        for handle in self.handles.values():
            handle.after_step()

    # -------------------------------------------------------------- per epoch
    def on_train_epoch_end(self, trainer, pl_module):
        for handle in self.handles.values():
            handle.epoch_end()
        metrics = self.metrics()
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        levels = [abs(v) for k, v in metrics.items() if "/gamma/" in k]
        if levels:  # one number for the progress bar: the largest |γ|
            pl_module.log("equirelax/gamma_max", max(levels), on_step=False, on_epoch=True, prog_bar=True)
        if trainer.is_global_zero:  # and one line per epoch in NequIP's train.log
            text = ", ".join(f"{k[len('equirelax/'):]}={v:.4g}" for k, v in metrics.items())
            _log.info(f"equirelax: epoch {trainer.current_epoch + 1}: {text}")

    def _prefix(self, model_name: str) -> str:
        return "equirelax/" + (f"{model_name}/" if len(self.handles) > 1 else "")

    def metrics(self) -> dict:
        metrics = {}
        for model_name, handle in self.handles.items():
            prefix = self._prefix(model_name)
            metrics.update({prefix + key: float(value) for key, value in handle.metrics().items()})
        return metrics

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.equivariance_check or batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        from ...adapters.nequip import nequip_equivariance_error

        generator = torch.Generator().manual_seed(trainer.current_epoch)
        self._equivariance = {}
        for model_name, graph_model in _submodels(pl_module.model).items():
            error = nequip_equivariance_error(graph_model, batch, n_rotations=1, generator=generator)
            prefix = self._prefix(model_name)
            self._equivariance[prefix + "equivariance_error/forces"] = error["forces"]["mean"]
            self._equivariance[prefix + "equivariance_error/energy"] = error["energy"]["mean"]

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._equivariance:
            pl_module.log_dict(self._equivariance, on_step=False, on_epoch=True, sync_dist=False)
            self._equivariance = None

    # ------------------------------------------------------------------- test
    # NequIP tests the relaxed model; the model a user ships is the exported one, so the same test metrics
    # (NequIP's own, from the config's test_metrics) are computed for it too, logged as exported_test<i>_epoch/…
    def on_test_epoch_start(self, trainer, pl_module):
        self._exported_test = None

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.export == "none" or not self.handles:
            return
        if self._exported_test is None:  # built at the first batch: after NequIP put in the weights it tests (EMA)
            exported = copy.deepcopy(pl_module.model)
            for graph_model in _submodels(exported).values():
                export(graph_model, self.export)
            managers = copy.deepcopy(pl_module.test_metrics)
            for manager in managers:
                manager.reset()
            self._exported_test = (exported, managers)
        exported, managers = self._exported_test
        target = pl_module.process_target(batch, batch_idx, dataloader_idx)
        relaxed, pl_module.model = pl_module.model, exported
        try:
            output = pl_module(dict(batch))
        finally:
            pl_module.model = relaxed
        with torch.no_grad():
            managers[dataloader_idx](output, target)

    def on_test_epoch_end(self, trainer, pl_module):
        if self._exported_test is None:
            return
        _, managers = self._exported_test
        for index, manager in enumerate(managers):
            metrics = {key: float(value) for key, value in manager.compute(prefix=f"exported_test{index}_epoch/").items()}
            manager.reset()
            pl_module.log_dict(metrics)
            if trainer.is_global_zero:
                text = ", ".join(f"{key.split('/', 1)[1]}={value:.6g}" for key, value in metrics.items())
                _log.info(f"equirelax: test set {index}, the exported model (branches {self.export}d, what "
                          f"exported.ckpt holds): {text}")
        self._exported_test = None

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # γ, λ and every statistic are module buffers, so they are in checkpoint["state_dict"] already;
        # this copy names the relax configuration, so a mismatching resume says what differs
        checkpoint[CHECKPOINT_KEY] = {name: handle.state_dict() for name, handle in self.handles.items()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return
        handles = relaxed_handles(pl_module.model)
        for name, state in saved.items():
            if name not in handles:
                raise ValueError(f"equirelax: the checkpoint has a relaxed model {name!r} that this run does not")
            differences = handles[name].signature_differences(state)
            if differences:
                raise ValueError("equirelax: the checkpoint comes from a different relax configuration; "
                                 + "; ".join(differences))

    # ----------------------------------------------------------------- export
    def on_train_end(self, trainer, pl_module):
        self._remove_hooks()
        if self.export == "none" or not trainer.is_global_zero:
            return
        source = None
        checkpoint_callback = trainer.checkpoint_callback
        if self.export_from == "best" and checkpoint_callback is not None and checkpoint_callback.best_model_path:
            source = checkpoint_callback.best_model_path
        out = self.export_path
        if out is None:
            directory = None
            if checkpoint_callback is not None:
                directory = os.path.dirname(checkpoint_callback.best_model_path or "") or checkpoint_callback.dirpath
            out = os.path.join(directory or trainer.default_root_dir, "exported.ckpt")
        with tempfile.TemporaryDirectory() as tmp:
            if source is None:  # no monitored checkpoint: export the weights as they are now
                source = os.path.join(tmp, "last.ckpt")
                trainer.save_checkpoint(source)
            export_checkpoint(source, out, self.export)
        self.exported_path = out
        print(f"equirelax: exported plain NequIP checkpoint ({self.export}) to {out}")

    def on_exception(self, trainer, pl_module, exception):
        self._remove_hooks()


def _plain_training_module_kwargs() -> set:
    from nequip.train import NequIPLightningModule

    return set(inspect.signature(NequIPLightningModule.__init__).parameters) - {"self"}


def load_checkpoint_models(checkpoint_path):
    """NequIP's ``ModelFromCheckpoint`` (a ModuleDict; the single model is ``["sole_model"]``), with NequIP's
    global state set up first as its own tools do; relaxed checkpoints need equirelax importable."""
    from nequip.model import ModelFromCheckpoint
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ModelFromCheckpoint(str(checkpoint_path))


def export_checkpoint(checkpoint_path, out_path, mode: str = "merge"):
    """Write a plain NequIP checkpoint from a relaxed one: branches merged (``merge``) or dropped (``drop``).

    The evaluation weights (EMA weights when the run used EMA) are exported; the
    result is a ``NequIPLightningModule`` checkpoint whose model config is the
    inner model config, which ``nequip-package``, ``ModelFromCheckpoint`` and
    NequIP's calculators load without equirelax.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"equirelax: unknown export mode {mode!r}; choose one of {EXPORT_MODES}")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    model_config = hparams.get("model", {})
    if not isinstance(model_config, dict) or model_config.get("_target_") != TARGET:
        raise ValueError(f"equirelax: {checkpoint_path} is not a relaxed NequIP checkpoint (its model _target_ is "
                         f"{model_config.get('_target_') if isinstance(model_config, dict) else model_config!r})")
    models = load_checkpoint_models(checkpoint_path)
    for graph_model in _submodels(models).values():
        export(graph_model, mode)

    inner = model_config["model"]
    allowed = _plain_training_module_kwargs()
    new_hparams = {k: v for k, v in hparams.items() if k in allowed}
    new_hparams["model"] = inner
    info = dict(hparams.get("info_dict", {}))
    training_module = {k: v for k, v in dict(info.get("training_module", {})).items() if k in allowed}
    training_module.update(_target_="nequip.train.NequIPLightningModule", model=inner)
    info["training_module"] = training_module
    new_hparams["info_dict"] = info

    model_state = {f"model.{key}": value for key, value in models.state_dict().items()}
    kept = {key: value for key, value in checkpoint["state_dict"].items()
            if not key.startswith(("model.", "ema."))}
    exported = {
        key: checkpoint[key] for key in ("epoch", "global_step", "pytorch-lightning_version", "hparams_name") if key in checkpoint
    }
    exported.update(hyper_parameters=new_hparams, state_dict={**kept, **model_state},
                    equirelax_export={"mode": mode, "source": str(checkpoint_path)})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(exported, out_path)
    return out_path
