"""SevenNet integration: ``equirelax-sevenn`` runs sevenn's own training (``sevenn input.yaml``) with a relaxed model.

It takes every ``sevenn`` argument and ``input.yaml`` unchanged; a ``relax:``
section in ``input.yaml`` turns relaxation on (sevenn refuses unknown sections,
so it is taken out before sevenn reads the file). Without it the run is exactly
``sevenn``'s::

    relax:
      controller: ace           # fixed | cr | ace | ace-resilient | recm (default: ace)
      targets: ["*_self_interaction_1.linear", "*_self_interaction_2.linear"]   # the default
      branch: lowrank           # the default (rank: 8); linear (dense) | mlp
      init: zero                # step-0 predictions are the checkpoint's (SevenNet-0 fine-tuning)
      export: merge             # merge | drop | none
      options: {}

sevenn has no callbacks, so the controller goes in where its training looks
its pieces up: ``Trainer.load_state_dicts`` (relax after the pretrained weights
are in, or before a relaxed checkpoint's are, so that nothing loads into a
renamed layer), ``processing_epoch_v2`` (the run's budget), ``Trainer.run_one_epoch``
(epoch end and a γ line in ``log.sevenn``) and ``Trainer.get_checkpoint_dict``
(the relax signature). Controller state lives in module buffers, so sevenn's
checkpoints carry it and ``train.continue`` with ``reset_optimizer: False``
resumes it. At the end ``checkpoint_best.pth`` becomes the exported plain
SevenNet checkpoint and the relaxed one is kept as ``checkpoint_best_relaxed.pth``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

RELAX_KEYS = ("controller", "targets", "branch", "rank", "init", "init_std", "group", "export", "options",
              "on_nonfinite")
CHECKPOINT_KEY = "equirelax"


def split_relax_section(argv: list[str]):
    """``(relax settings or None, argv for sevenn, temporary input file or None)``: the ``relax`` section taken
    out of the ``input.yaml`` named in ``argv``."""
    import yaml

    from ...core.settings import validate_relax_settings

    argv = list(argv)
    index = next((i for i, arg in enumerate(argv) if arg.endswith((".yaml", ".yml")) and os.path.isfile(arg)), None)
    if index is None:
        return None, argv, None
    with open(argv[index], encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    if "relax" not in content:
        return None, argv, None
    settings = validate_relax_settings(content.pop("relax"), keys=RELAX_KEYS)
    # next to the original: sevenn reads data paths relative to the working directory, not the file
    stripped = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, prefix=".equirelax-input-",
                                           dir=os.path.dirname(os.path.abspath(argv[index])))
    yaml.safe_dump(content, stripped, sort_keys=False)
    stripped.close()
    argv[index] = stripped.name
    return settings, argv, stripped.name


def _is_relaxed_state(state: dict) -> bool:
    return any(key.endswith(".gamma") or ".ctrl_" in key for key in state)


def relaxed_model(checkpoint, settings: dict):
    """The relaxed model of a relaxed sevenn checkpoint (a path or ``SevenNetCheckpoint``): SevenNet's model built
    from the checkpoint's config, relaxed with ``settings`` (the run's relax settings), every weight loaded."""
    import equirelax
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.util import load_checkpoint

    if not hasattr(checkpoint, "model_state_dict"):
        checkpoint = load_checkpoint(str(checkpoint))
    model = build_E3_equivariant_model(checkpoint.config)
    options = dict(settings["options"])
    if settings["controller"] == "cr":
        options.setdefault("epochs", 1)
    equirelax.relax(model, settings["controller"], targets=settings.get("targets"), branch=settings["branch"],
                    init=settings["init"], adapter="sevenn", **{k: settings[k] for k in ("group", "rank")
                                                               if k in settings}, **options)
    missing, unexpected = model.load_state_dict(checkpoint.model_state_dict, strict=False)
    if missing or unexpected:
        raise ValueError("equirelax: the checkpoint comes from other relax settings "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return model


class SevennSession:
    """The relaxation of one sevenn run."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.handle = None
        self.plain_keys: set = set()
        self.config = None
        self.working_dir = None

    def relax(self, trainer, config=None) -> None:
        import equirelax
        from equirelax.core.controllers import check_schedule_fits

        if self.handle is not None:
            return
        model = trainer.model.module if getattr(trainer, "distributed", False) else trainer.model
        self.plain_keys = set(model.state_dict())
        s = self.settings
        options = dict(s["options"])
        epochs = (config or {}).get("epoch")
        if s["controller"] == "cr":
            options.setdefault("epochs", epochs)
            check_schedule_fits(options.get("epochs"), epochs, "sevenn", "train.epoch")
        extra = {k: s[k] for k in ("init_std", "group", "on_nonfinite", "rank") if k in s}
        self.handle = equirelax.relax(model, s["controller"], targets=s.get("targets"), branch=s["branch"],
                                      init=s["init"], adapter="sevenn", **extra, **options)
        added = list(self.handle.parameters())
        trainer.optimizer.add_param_group({"params": added})
        scheduler = getattr(trainer, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "base_lrs"):  # schedulers keep one base lr per group
            scheduler.base_lrs.append(trainer.optimizer.param_groups[-1]["lr"])
        self.handle.wrap(trainer.optimizer)
        from sevenn.logger import Logger

        Logger().writeline(f"equirelax: relaxed {list(self.handle.short_names().values())} with controller "
                           f"{s['controller']!r} {self.handle.controller.options}")

    # ---------------------------------------------------------------- patches
    def load_state_dicts(self, original):
        def load_state_dicts(trainer, model_state_dict=None, optimizer_state_dict=None, scheduler_state_dict=None,
                             strict=True):
            if model_state_dict is not None and _is_relaxed_state(model_state_dict):
                # a relaxed run resumed: the layers must be relaxed before its weights go in, all of them
                self.relax(trainer, self.config)
                original(trainer, model_state_dict, optimizer_state_dict, scheduler_state_dict, strict=True)
                self.handle.resync()  # steps, epochs and controller statistics came back with the weights
                return
            original(trainer, model_state_dict, optimizer_state_dict, scheduler_state_dict, strict=strict)
            self.relax(trainer, self.config)

        return load_state_dicts

    def build_model(self, original):
        # sevenn rebuilds the model of a checkpoint it continues from: a relaxed one is built plain, relaxed as
        # this run relaxes, then takes every weight (a checkpoint of other relax settings stops here, naming keys)
        def build_model(checkpoint, *args, **kwargs):
            if not _is_relaxed_state(checkpoint.model_state_dict):
                return original(checkpoint, *args, **kwargs)
            return relaxed_model(checkpoint, self.settings)

        return build_model

    def train_v2(self, original):
        def train_v2(config, working_dir, *args, **kwargs):
            self.config, self.working_dir = config, working_dir
            return original(config, working_dir, *args, **kwargs)

        return train_v2

    def processing_epoch_v2(self, original):
        def processing_epoch_v2(config, trainer, loaders, start_epoch=1, *args, **kwargs):
            self.relax(trainer, config)  # a run from scratch: nothing was loaded
            with contextlib.suppress(TypeError, KeyError):  # sevenn steps once per batch for train.epoch epochs
                self.handle.set_total_steps(int(config["epoch"]) * len(loaders["trainset"]))
            return original(config, trainer, loaders, start_epoch, *args, **kwargs)

        return processing_epoch_v2

    def run_one_epoch(self, original):
        def run_one_epoch(trainer, loader, is_train=False, *args, **kwargs):
            result = original(trainer, loader, is_train, *args, **kwargs)
            if is_train and self.handle is not None:
                from sevenn.logger import Logger

                self.handle.epoch_end()
                metrics = self.handle.metrics()
                Logger().writeline("equirelax: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            return result

        return run_one_epoch

    def get_checkpoint_dict(self, original):
        def get_checkpoint_dict(trainer):
            checkpoint = original(trainer)
            if self.handle is not None:
                checkpoint[CHECKPOINT_KEY] = self.handle.signature()
            return checkpoint

        return get_checkpoint_dict

    @contextlib.contextmanager
    def installed(self):
        import sevenn.scripts.processing_epoch as processing_epoch
        import sevenn.scripts.train as train
        from sevenn.checkpoint import SevenNetCheckpoint
        from sevenn.train.trainer import Trainer

        self.config = None
        patches = [(Trainer, "load_state_dicts"), (Trainer, "run_one_epoch"), (Trainer, "get_checkpoint_dict"),
                   (processing_epoch, "processing_epoch_v2"), (train, "train_v2"),
                   (SevenNetCheckpoint, "build_model")]
        saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
        try:
            for owner, name, original in saved:
                setattr(owner, name, getattr(self, name)(original))
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    # ----------------------------------------------------------------- export
    def export_best(self, working_dir) -> Path | None:
        """``checkpoint_best.pth`` → the exported plain SevenNet checkpoint; the relaxed one is kept beside it."""
        import torch

        import equirelax

        mode = self.settings["export"]
        best = Path(working_dir) / "checkpoint_best.pth"
        if mode == "none" or self.handle is None or not best.exists():
            return None
        checkpoint = torch.load(best, map_location="cpu", weights_only=False)
        model = self.handle.model  # training is over: the run's own model takes the best weights and is exported
        model.load_state_dict(checkpoint["model_state_dict"])
        state = equirelax.export(model, mode=mode).state_dict()
        checkpoint["model_state_dict"] = {k: v.detach().clone() for k, v in state.items() if k in self.plain_keys}
        for key in ("optimizer_state_dict", "scheduler_state_dict", CHECKPOINT_KEY):
            checkpoint.pop(key, None)  # the relaxed run's; a fine-tuning from here starts its own
        os.replace(best, best.with_name("checkpoint_best_relaxed.pth"))
        torch.save(checkpoint, best)
        from sevenn.logger import Logger

        Logger().writeline(f"equirelax: {best}: plain SevenNet checkpoint, branches {mode}d (SevenNetCalculator, "
                           f"sevenn_get_model; no equirelax needed); checkpoint_best_relaxed.pth: the relaxed one")
        return best


def main(argv=None) -> None:
    """``equirelax-sevenn``: ``sevenn`` plus the ``relax`` section of ``input.yaml``."""
    if importlib.util.find_spec("sevenn") is None:
        sys.exit("equirelax: equirelax-sevenn runs sevenn's training, and this environment has no sevenn: install "
                 "it with pip install 'equirelax[sevenn]'")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings, sevenn_argv, stripped = split_relax_section(argv)
    except ValueError as error:
        sys.exit(str(error))
    from sevenn.main.sevenn import main as sevenn_main

    sys.argv = ["sevenn", *sevenn_argv]
    try:
        if settings is None:
            sevenn_main()
            return
        session = SevennSession(settings)
        try:
            with session.installed(), _removed_once_read(stripped):
                sevenn_main()
        except ValueError as error:
            if str(error).startswith("equirelax:"):
                sys.exit(str(error))
            raise
        session.export_best(session.working_dir or os.getcwd())
    finally:
        if stripped is not None:
            Path(stripped).unlink(missing_ok=True)


@contextlib.contextmanager
def _removed_once_read(stripped: str):
    """The stripped ``input.yaml`` is removed as soon as sevenn has read it: a run killed later (a job's time
    limit) leaves no file beside the user's."""
    import sevenn.parse_input as parse_input

    original = parse_input.read_config_yaml

    def read_config_yaml(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        finally:
            if os.path.abspath(path) == os.path.abspath(stripped):
                Path(stripped).unlink(missing_ok=True)

    parse_input.read_config_yaml = read_config_yaml
    try:
        yield
    finally:
        parse_input.read_config_yaml = original
