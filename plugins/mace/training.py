"""MACE integration: ``equirelax-mace-train`` runs MACE's own training with a relaxed model.

It takes every ``mace_run_train`` argument and YAML config unchanged. A
``relax:`` section in the YAML config (or ``--relax='{json}'`` on the command
line) turns relaxation on; without it the run is exactly ``mace_run_train``.

    relax:
      controller: recm            # fixed | cr | ace | ace-resilient | recm | entry-point name
      targets: ["interactions.*.linear", "products.*.linear"]   # optional (these are the default)
      branch: lowrank             # lowrank (default, rank: 8) | linear (dense) | mlp
      init: zero                  # zero: step-0 predictions unchanged (pretrained); random: papers' init
      export: merge               # merge | drop | none: the exported plain-MACE model written at the end
      options: {}                 # controller options, e.g. {form: resilient, rho: 2.0}

``field_input: true`` instead gives the model each structure's external field (extxyz info
``external_field``) as an equivariant input (``plugins/mace/field.py``): the model to compare relaxation with
when the cause of the broken symmetry is known.

MACE has no plugin mechanism, so the controller goes in where ``run_train``
looks its helpers up: ``configure_model`` (relax the built or foundation model),
``get_params_options`` (keep weight decay on the wrapped linear weights),
``get_optimizer`` (attach the controller to ``optimizer.step``), and in
``mace.tools.train`` ``train_one_epoch`` (epoch end) and ``valid_err_log``
(γ, λ, gap and equivariance error go into MACE's own results log). Controller
state lives in module buffers, so MACE's checkpoints carry it and
``--restart_latest`` restores it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from pathlib import Path

from .config import RelaxConfigError, split_equirelax_config
from .field import field_input_setup

CHECKPOINT_KEY = "equirelax"


class MaceSession:
    """The relaxation of one MACE run: the handle, a probe batch and the export."""

    def __init__(self, config: dict):
        self.config = config
        self.handle = None
        self.probe_batch = None
        self._evaluation, self._metrics = None, {}
        self.model_names: dict = {}

    @staticmethod
    def total_steps(args, train_loader) -> int | None:
        """Optimizer steps of the whole run: MACE steps once per batch for max_num_epochs (restarts
        included: the step count comes back with the checkpoint)."""
        try:
            return int(args.max_num_epochs) * len(train_loader) or None
        except TypeError:  # a loader without a length
            return None

    # ---------------------------------------------------------------- patches
    def configure_model(self, original):
        def configure_model(args, train_loader, *rest, **kwargs):
            import equirelax
            from equirelax.core.controllers import check_schedule_fits

            model, output_args = original(args, train_loader, *rest, **kwargs)
            c = self.config
            extra = {k: c[k] for k in ("init_std", "group", "on_nonfinite", "rank") if k in c}
            options = dict(c["options"])
            if c["controller"] == "cr" and "epochs" not in options:
                options["epochs"] = args.max_num_epochs
            if c["controller"] == "cr":
                check_schedule_fits(options.get("epochs"), args.max_num_epochs, "MACE", "max_num_epochs")
            self.handle = equirelax.relax(
                model, c["controller"], targets=c.get("targets"), branch=c["branch"], init=c["init"],
                adapter="mace", total_steps=self.total_steps(args, train_loader), **extra, **options,
            )
            if c["export"] != "none":
                self.model_names = {"relaxed": f"{args.name}_relaxed.model", "exported": f"{args.name}.model"}
            if c.get("all_defaults"):
                logging.info("equirelax: the relax section is empty, so every relax setting is its default "
                              f"(controller {c['controller']!r}, branch {c['branch']!r}, init {c['init']!r}, "
                              f"export {c['export']!r}, the MACE adapter's default targets); remove the section "
                              "to train without relaxation")
            frozen = _frozen_blocks(getattr(args, "freeze", None))
            caught = sorted(name for name in self.handle.layers if name.split(".")[0] in frozen)
            if caught:
                raise ValueError(f"equirelax: --freeze {args.freeze} freezes MACE's {sorted(frozen)}, which hold the "
                                 f"relaxed layers {caught}: their branches could not train; freeze fewer blocks or "
                                 f"relax other layers (targets)")
            logging.info(f"equirelax: relaxed {sorted(self.handle.layers)} with controller {c['controller']!r}")
            self.probe_batch = _first_batch(train_loader)
            return model, output_args

        return configure_model

    def get_params_options(self, original):
        def get_params_options(args, model):
            options = original(args, model)
            # MACE decays "linear.weight" parameters of the interactions; a relaxed linear's weight is
            # now "linear.base.weight", so move it back to the decayed group to keep MACE's behaviour.
            groups = {g.get("name"): g for g in options["params"]}
            decay, no_decay = groups.get("interactions_decay"), groups.get("interactions_no_decay")
            if decay is not None and no_decay is not None:
                named = dict(model.interactions.named_parameters())
                moved = {id(p) for n, p in named.items() if "linear.base.weight" in n}
                decay["params"] = list(decay["params"]) + [p for p in no_decay["params"] if id(p) in moved]
                no_decay["params"] = [p for p in no_decay["params"] if id(p) not in moved]
            return options

        return get_params_options

    def get_optimizer(self, original):
        def get_optimizer(args, param_options):
            optimizer = original(args, param_options)
            return self.handle.wrap(optimizer) if self.handle is not None else optimizer

        return get_optimizer

    def train_one_epoch(self, original):
        def train_one_epoch(*args, **kwargs):
            epoch = kwargs.get("epoch")
            if self.handle is not None and epoch is not None and self.handle.epoch != epoch:
                self.handle.resync(epoch)  # resumed from a checkpoint: controller state came with the weights
            result = original(*args, **kwargs)
            if self.handle is not None:
                self.handle.epoch_end()
            return result

        return train_one_epoch

    def valid_err_log(self, original):
        def valid_err_log(valid_loss, eval_metrics, logger, *args, **kwargs):
            if self.handle is not None:
                # MACE calls this once per head: measure and log once per evaluation, give every head the numbers
                epoch = kwargs.get("epoch", args[1] if len(args) > 1 else None)
                evaluation = (epoch, self.handle.step)
                if self._evaluation != evaluation:
                    self._evaluation, self._metrics = evaluation, self.metrics()
                    text = ", ".join(f"{k[len('equirelax/'):]}={v:.4g}" for k, v in self._metrics.items())
                    logging.info(f"equirelax: {text}")
                eval_metrics.update(self._metrics)
            return original(valid_loss, eval_metrics, logger, *args, **kwargs)

        return valid_err_log

    def metrics(self) -> dict:
        metrics = {f"equirelax/{k}": v for k, v in self.handle.metrics().items()}
        if self.probe_batch is not None:
            import torch

            from ...adapters.mace import mace_equivariance_error

            model = self.handle.model
            device = next(model.parameters()).device
            batch = self.probe_batch.to(device).to_dict()
            was_training = model.training
            model.eval()
            try:
                # rotations from a private stream, not from MACE's; unoptimized TorchScript, so that these extra
                # calls do not change when the graph executor optimizes e3nn's scripted modules for MACE's own
                # calls (an optimized graph rounds differently: the run would no longer match plain MACE's bits)
                with torch.jit.optimized_execution(False):
                    error = mace_equivariance_error(model, batch, n_rotations=2,
                                                    generator=torch.Generator().manual_seed(self.handle.step))
            finally:
                model.train(was_training)
            metrics["equirelax/equivariance_error/energy"] = error["energy"]["mean"]
            metrics["equirelax/equivariance_error/forces"] = error["forces"]["mean"]
        return metrics

    # ------------------------------------------------------------ checkpoints
    def create_checkpoint(self, original):
        def create_checkpoint(state):
            checkpoint = original(state)
            if self.handle is not None:  # γ and controller state are buffers in "model"; this names the setup
                checkpoint[CHECKPOINT_KEY] = self.handle.signature()
            return checkpoint

        return staticmethod(create_checkpoint)

    def load_checkpoint(self, original):
        # run_train's --restart_latest catches every Exception from loading and silently trains from scratch;
        # SystemExit gets through, so a mismatching checkpoint stops the run with the reason instead
        def load_checkpoint(state, checkpoint, strict):
            if self.handle is not None:
                saved = checkpoint.get(CHECKPOINT_KEY)
                if saved is None:
                    raise SystemExit(
                        "equirelax: the checkpoint to restart from was written without relaxation (plain MACE); "
                        "restart it without a relax section, or start the relaxed run in a new directory (or "
                        "fine-tune the plain model with --foundation_model)"
                    )
                differences = self.handle.signature_differences(saved)
                if differences:
                    raise SystemExit("equirelax: the checkpoint to restart from comes from a different relax "
                                     "configuration; " + "; ".join(differences))
            return original(state, checkpoint, strict)

        return staticmethod(load_checkpoint)

    @contextlib.contextmanager
    def installed(self):
        import mace.cli.run_train as run_train
        from mace.tools.checkpoint import CheckpointBuilder

        train_module = sys.modules["mace.tools.train"]  # mace.tools.train is also the name of a function
        patches = [
            (run_train, "configure_model"), (run_train, "get_params_options"), (run_train, "get_optimizer"),
            (train_module, "train_one_epoch"), (train_module, "valid_err_log"),
            (CheckpointBuilder, "create_checkpoint"), (CheckpointBuilder, "load_checkpoint"),
            (run_train, "create_error_table"),
        ]
        saved = [(module, name, module.__dict__[name] if isinstance(module, type) else getattr(module, name))
                 for module, name in patches]
        try:
            for module, name, original in saved:
                if isinstance(original, staticmethod):
                    original = original.__func__
                setattr(module, name, getattr(self, name)(original))
            yield self
        finally:
            for module, name, original in saved:
                setattr(module, name, original)

    # ----------------------------------------------------------------- export
    def create_error_table(self, original):
        # MACE's final error tables are of the relaxed model; the model a user ships is the exported one,
        # so each table is followed by the same table for it (MACE's own evaluation, labelled)
        def create_error_table(*args, **kwargs):
            table = original(*args, **kwargs)
            mode = self.config["export"]
            model = kwargs.get("model")
            if self.handle is None or mode == "none" or model is None:
                return table
            import equirelax

            exported = equirelax.export(copy.deepcopy(getattr(model, "module", model)), mode=mode)
            exported_table = original(*args, **{**kwargs, "model": exported})
            name = self.model_names.get("exported", "the exported model")
            return _LabelledTables([(f"relaxed model ({self.model_names.get('relaxed', 'with branches')})", table),
                                    (f"exported model ({name}, branches {mode}d: the model to use)",
                                     exported_table)])

        return create_error_table

    def export_models(self, args) -> list[Path]:
        """MACE's conventions for what a user runs: ``<name>.model`` becomes the exported plain MACE model
        (branches merged or dropped) and ``<name>_compiled.model`` its TorchScript; the relaxed model, which
        needs equirelax, is kept as ``<name>_relaxed.model``. A run that ends relaxed (some γ ≠ 0) also gets
        ``<name>_relaxed_compiled.model``: the relaxed model frozen (``export(mode="freeze")``) and compiled as
        MACE compiles, which MACECalculator and MACE's LAMMPS converter load without equirelax.
        With ``export: none`` MACE's files stay as written."""
        import torch

        import equirelax

        mode = self.config["export"]
        written = []
        for stem in (args.name, f"{args.name}_stagetwo"):
            source = Path(args.model_dir) / f"{stem}.model"
            if not source.exists():
                continue
            if mode == "none":
                logging.info(f"equirelax: {source} is the relaxed model (export: none); loading it needs equirelax")
                continue
            model = torch.load(source, map_location="cpu", weights_only=False)
            relaxed = Path(args.model_dir) / f"{stem}_relaxed.model"
            os.replace(source, relaxed)
            relaxed_compiled = Path(args.model_dir) / f"{stem}_relaxed_compiled.model"
            relaxed_compiled.unlink(missing_ok=True)
            deployable = _ends_relaxed(model) and _compile_to(
                lambda: equirelax.export(model, "freeze", inplace=False), relaxed_compiled, "the relaxed model")
            equirelax.export(model, mode=mode)
            torch.save(model, source)
            written += [source, relaxed] + ([relaxed_compiled] if deployable else [])
            compiled = Path(args.model_dir) / f"{stem}_compiled.model"
            compiled.unlink(missing_ok=True)  # MACE's compile of the relaxed model, if it had one
            if _compile_to(lambda: copy.deepcopy(model), compiled, "the exported model"):
                written.append(compiled)
            logging.info(f"equirelax: {source}: plain MACE model, branches {mode}d (MACECalculator, no equirelax "
                         f"needed)" + (f"; {compiled}: its TorchScript (LAMMPS)" if compiled.exists() else "")
                         + f"; {relaxed}: the relaxed model (needs equirelax)"
                         + (f"; {relaxed_compiled}: the relaxed model's TorchScript, γ and branches kept "
                            f"(MACECalculator, no equirelax needed)" if deployable else ""))
        return written


def _first_batch(loader):
    """A batch of ``loader`` drawn without moving its random stream: a shuffled loader draws each epoch's
    order from its generator (MACE seeds one with --seed), so drawing here would shift every epoch's order
    away from the vanilla run's with the same seed."""
    import torch

    # (the loader and its sampler usually share one: restoring it twice restores it)
    generators = [g for g in (getattr(loader, "generator", None),
                              getattr(getattr(loader, "sampler", None), "generator", None)) if g is not None]
    states = [g.get_state() for g in generators]
    try:
        with torch.random.fork_rng(devices=[]):  # a loader without a generator draws from the global stream
            return next(iter(loader))
    except (StopIteration, TypeError):
        return None
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _frozen_blocks(freeze) -> set:
    """The top-level MACE blocks ``--freeze N`` freezes (``mace.tools.scripts_utils.get_params_options``)."""
    if not freeze or freeze < 1:
        return set()
    return {"node_embedding"} | {block for level, block in ((5, "interactions"), (6, "products"), (7, "readouts"))
                                 if freeze >= level}


def _ends_relaxed(model) -> bool:
    """Whether some branch still acts (γ ≠ 0): only then does the relaxed model differ from the exported one."""
    return any(type(m).__name__ == "RelaxedLayer" and float(m.gamma) != 0.0 for m in model.modules())


def _compile_to(build, path: Path, what: str, raise_errors: bool = False) -> bool:
    """As MACE does for its own models: a TorchScript file (e3nn's ``jit.compile``) of ``build()``, for
    MACECalculator, LAMMPS and C++ hosts; a model that cannot be compiled is logged and skipped, as MACE does."""
    import warnings

    import torch
    from e3nn.util import jit

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TorchScript's notes on e3nn's annotations
            torch.jit.save(jit.compile(build()), path)
        return True
    except Exception as error:  # noqa: BLE001  (MACE skips compilation failures the same way)
        if raise_errors:
            raise
        logging.warning(f"equirelax: could not compile {what}: {error}")
        return False


class _LabelledTables:
    """Two of MACE's error tables printed as one, each under its label."""

    def __init__(self, tables):
        self.tables = tables

    def __str__(self):
        return "\n".join(f"equirelax: {label}:\n{table}" for label, table in self.tables)


def main(argv=None) -> None:
    """``equirelax-mace-train``: ``mace_run_train`` plus the ``relax`` and ``field_input`` settings."""
    import importlib.util

    if importlib.util.find_spec("mace") is None:
        sys.exit("equirelax: equirelax-mace-train runs MACE's training, and this environment has no MACE: install "
                 "it with pip install 'equirelax[mace]' (mace-torch 0.3.16 pins e3nn 0.4.4, so MACE usually has an "
                 "environment of its own, e.g. .venv-mace)")
    argv = sys.argv[1:] if argv is None else list(argv)
    stripped_path = None
    try:
        config, field_key, mace_argv, stripped_path = split_equirelax_config(argv)
    except (RelaxConfigError, ValueError, TypeError) as error:
        sys.exit(str(error))
    try:
        _run(config, mace_argv, field_key, stripped_path)
    finally:
        if stripped_path is not None:
            Path(stripped_path).unlink(missing_ok=True)


@contextlib.contextmanager
def distributed_setup(args, session: MaceSession | None = None):
    """MACE's ``--distributed`` path, made to run on CPU (gloo) and with RECM.

    MACE initialises a process group only for CUDA/XPU and builds ``DDP(model,
    device_ids=[local_rank])``, which a CPU model refuses; on CPU this opens a
    gloo group (from torchrun's environment) and leaves ``device_ids`` out. On RECM's
    probing steps its probe maps stand in for the branches, which then go unused, so
    DDP is told that some parameters may go unused in a step.
    """
    if not getattr(args, "distributed", False):
        yield
        return
    import torch.distributed as dist
    from mace.cli import run_train

    cpu = str(args.device) == "cpu"
    if cpu and not dist.is_initialized():
        dist.init_process_group("gloo")
    original = run_train.DDP

    def ddp(module, *a, **kwargs):
        if cpu:
            kwargs.pop("device_ids", None)
            a = ()
        handle = session.handle if session is not None else None  # relaxed before MACE wraps the model
        if handle is not None and handle.controller.needs_probe:
            kwargs["find_unused_parameters"] = True
        return original(module, *a, **kwargs)

    run_train.DDP = ddp
    try:
        yield
    finally:
        run_train.DDP = original
        if cpu and dist.is_initialized():
            dist.destroy_process_group()


def check_fine_tuning_flags(args) -> None:
    """MACE fine-tuning options that would undo or fight a relaxation stop before training, naming what to do."""
    if getattr(args, "lora", False):
        sys.exit("equirelax: --lora and a relax section both add a trainable branch next to MACE's linear layers "
                 "(LoRA's equivariant, equirelax's not); use one: remove relax: for MACE's LoRA fine-tuning, or "
                 "lora for relaxation. `equirelax compare --controllers vanilla lora ace ...` compares them")
    if getattr(args, "enable_cueq", False) or getattr(args, "only_cueq", False) or getattr(args, "enable_oeq", False):
        sys.exit("equirelax: --enable_cueq/--enable_oeq rebuild MACE's model with accelerated kernels, which would "
                 "drop the relaxed layers; train relaxed without them (the exported <name>.model is a plain MACE "
                 "model that mace's convert_e3nn_cueq accelerates afterwards)")


def _run(config, mace_argv, field_key=None, stripped_path=None) -> None:
    import mace  # noqa: F401
    from mace import tools
    from mace.cli import run_train

    args = tools.build_default_arg_parser().parse_args(mace_argv)
    if stripped_path is not None:  # MACE has read its config: a run killed later leaves no file behind
        Path(stripped_path).unlink(missing_ok=True)
    if config is None:
        with distributed_setup(args), field_input_setup(args, field_key):
            run_train.run(args)
        return
    check_fine_tuning_flags(args)
    session = MaceSession(config)
    try:
        with distributed_setup(args, session), field_input_setup(args, field_key), session.installed():
            run_train.run(args)
    except (ValueError, TypeError) as error:
        if str(error).startswith("equirelax:"):
            sys.exit(str(error))  # a configuration problem: say it plainly, without MACE's traceback
        raise
    if int(os.environ.get("RANK", "0")) == 0:  # one writer for the exported files
        session.export_models(args)
