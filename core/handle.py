"""The handle a relaxed model is driven through: controller hooks, levels, metrics, modes and state."""

from __future__ import annotations

import contextlib
import warnings

import pluggy
import torch
from torch import nn

from . import hookspecs
from .controllers import get_controller
from .distributed import all_ranks_true
from .layer import RelaxedLayer
from .samples import install_sample_split

STATE_FORMAT = 1
NONFINITE_POLICIES = ("warn", "raise")


class RelaxHandle:
    """Drives a relaxed model: levels, controller hooks, state, projection modes.

    With a plain PyTorch loop, ``handle.wrap(optimizer)`` is all that is needed
    per step; call ``handle.epoch_end()`` after each epoch. Host trainers call
    ``after_backward`` / ``after_step`` / ``epoch_end`` from their own hooks.
    """

    def __init__(self, model, layers, controller, adapter, config):
        self.model = model
        self.layers = layers
        self.controller = controller
        self.adapter = adapter
        self.config = config
        self.plugins = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugins.add_hookspecs(hookspecs)
        self.plugins.register(controller, name="controller")
        self.plugins.load_setuptools_entrypoints(hookspecs.PROJECT)
        self.hook = self.plugins.hook
        self.epoch = 0
        self.step = 0  # optimizer steps taken (mirrored in each layer's ctrl_step buffer for checkpoints)
        self._finite = None
        self._reported_nonfinite = 0
        self._wrapped = []
        for layer in layers.values():
            layer.add_state("epoch", torch.zeros((), dtype=torch.long))
            layer.add_state("step", torch.zeros((), dtype=torch.long))
            layer.add_state("nonfinite", torch.zeros((), dtype=torch.long))
            layer.relax_config = {**config, "controller": controller.name, "options": dict(controller.options)}
            layer._handle = self
        # RECM's probe maps each learn from their own half of the samples
        self._sample_split = install_sample_split(model, layers.values(), adapter) if controller.needs_probe else None
        self.hook.equirelax_model_patched(handle=self, layers=layers)

    @classmethod
    def attach(cls, model: nn.Module) -> "RelaxHandle":
        """The handle driving ``model``'s relaxed layers, rebuilt from the layers when the model was
        copied, unpickled or rebuilt from a checkpoint (controller state comes from their buffers)."""
        from .registry import get_adapter

        layers = {n: m for n, m in model.named_modules() if isinstance(m, RelaxedLayer)}
        if not layers:
            raise ValueError("equirelax: the model has no relaxed layer (relax it with equirelax.relax first)")
        live = {getattr(layer, "_handle", None) for layer in layers.values()}
        if len(live) == 1:
            (handle,) = live
            if handle is not None and handle.model is model and set(handle.layers) == set(layers):
                return handle
        configs = [getattr(layer, "relax_config", None) for layer in layers.values()]
        if any(c is None for c in configs) or any(c != configs[0] for c in configs):
            raise ValueError(
                "equirelax: the relaxed layers of this model come from different relax() calls; "
                "attach a handle to each relaxed sub-model separately"
            )
        config = dict(configs[0])
        controller = get_controller(config.pop("controller"), **config.pop("options"))
        saved = {name: {k: b.detach().clone() for k, b in layer.named_buffers(recurse=False)}
                 for name, layer in layers.items()}
        saved_gamma = {name: layer.gamma.detach().clone() for name, layer in layers.items()}
        first = next(iter(layers.values()))
        handle = cls(model, layers, controller, get_adapter(first.adapter), config)
        with torch.no_grad():  # setup() reset the controller buffers: put the trained state back
            for name, layer in layers.items():
                layer.gamma.copy_(saved_gamma[name])
                for key, value in saved[name].items():
                    if key in layer._buffers:
                        layer._buffers[key] = value
        handle.resync()
        return handle

    # ----------------------------------------------------------------- budget
    @property
    def total_steps(self) -> int | None:
        """The run's total number of optimizer steps (None: not known yet)."""
        return self.config.get("total_steps")

    def set_total_steps(self, total_steps: int | None):
        """Tell the controllers the run's budget in optimizer steps (host plugins call this at train start)."""
        if total_steps is not None and (not isinstance(total_steps, int) or isinstance(total_steps, bool)
                                        or total_steps < 1):
            raise ValueError(f"equirelax: total_steps must be a positive integer, got {total_steps!r}")
        self.config["total_steps"] = total_steps
        for layer in self.layers.values():
            if layer.relax_config is not None:
                layer.relax_config["total_steps"] = total_steps

    def require_total_steps(self, who: str) -> int:
        """The budget, or a clear error naming the two ways to give it."""
        if self.total_steps is None:
            raise ValueError(
                f"equirelax: {who} needs the run's total number of optimizer steps to finish within it; pass "
                f"relax(..., total_steps=T) or call handle.set_total_steps(T) before training (the MACE and "
                f"NequIP plugins fill it in from the trainer)"
            )
        return self.total_steps

    # ---------------------------------------------------------------- reading
    def levels(self) -> dict:
        """γ of every relaxed layer, as floats (reads from the device)."""
        return {name: float(layer.gamma.detach()) for name, layer in self.layers.items()}

    def breaking(self) -> dict:
        """The symmetry map: per layer, ‖γ·P⊥f_neq(x)‖ / ‖f_eq(x)‖ on the last training batch (see
        ``RelaxedLayer.breaking``). Unlike γ, which the branch's weights can offset, this measures how far
        each layer's output is from equivariant. Layers not trained yet are left out."""
        values = {name: layer.breaking() for name, layer in self.layers.items()}
        return {name: value for name, value in values.items() if value is not None}

    def parameters(self):
        """Parameters equirelax added for the host's optimizer: branch weights and learnable γ (RECM's probe
        maps are buffers that RECM trains itself)."""
        for layer in self.layers.values():
            yield from layer.branch.parameters()
            if isinstance(layer.gamma, nn.Parameter):
                yield layer.gamma

    def short_names(self) -> dict:
        """``{layer: short name}``: what logs, reports and plots call each layer (the adapter's short name;
        the full module path where two would coincide)."""
        short = {name: self.adapter.short_name(name) for name in self.layers}
        if len(set(short.values())) < len(short):
            return {name: name for name in self.layers}
        return short

    def metrics(self) -> dict:
        """Scalars to log: γ per layer plus the controller's own (λ, slack, gap, θ); layers by short name."""
        metrics = {f"gamma/{name}": value for name, value in self.levels().items()}
        metrics.update({f"breaking/{name}": value for name, value in self.breaking().items()})
        for extra in self.hook.equirelax_metrics(handle=self):
            metrics.update(extra or {})
        metrics["nonfinite_steps"] = self._first().state("nonfinite").item()
        renamed = {}
        short = {full: name for full, name in self.short_names().items() if full != name}
        for key, value in metrics.items():
            for full, name in short.items():
                if key.endswith("/" + full):
                    key = key[: -len(full)] + name
                    break
            renamed[key] = value
        return renamed

    def _first(self) -> RelaxedLayer:
        return next(iter(self.layers.values()))

    # --------------------------------------------------------------- training
    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Attach the controller to ``optimizer`` (returned as is, so LR schedulers keep working).

        Parameters equirelax added that the optimizer does not hold yet are added
        as a new param group with the optimizer's defaults (its constructor's lr etc.).
        """
        if any(opt is optimizer for opt in self._wrapped):
            return optimizer  # already attached: a second set of hooks would run the controller twice
        self._wrapped.append(optimizer)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.parameters() if id(p) not in held]
        if missing:
            optimizer.add_param_group({"params": missing})
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.after_backward())
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())
        return optimizer

    def _gradients_finite(self) -> torch.Tensor:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            finite = torch.ones((), dtype=torch.bool, device=self._first().gamma.device)
        else:  # one fused reduction; a NaN/inf anywhere makes its tensor's norm non-finite
            finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        return all_ranks_true(finite)

    def after_backward(self):
        """Call after ``loss.backward()`` and before ``optimizer.step()``."""
        if not self.controller.has_step_state and self.config["on_nonfinite"] == "warn":
            self._finite = torch.ones((), dtype=torch.bool, device=self._first().gamma.device)
            self.hook.equirelax_after_backward(handle=self, finite=self._finite)
            return
        finite = self._gradients_finite()
        self._finite = finite
        for layer in self.layers.values():
            counter = layer.state("nonfinite")
            counter.add_((~finite).long())
        if self.config["on_nonfinite"] == "raise" and not bool(finite):
            self._clear_step()
            raise FloatingPointError(
                f"equirelax: non-finite loss or gradient (NaN/inf) at epoch {self.epoch}; the controller state "
                f"was not updated. Lower the learning rate or check the data (on_nonfinite='warn' skips such steps)"
            )
        self.hook.equirelax_after_backward(handle=self, finite=finite)

    def after_step(self):
        """Call after ``optimizer.step()``."""
        finite = self._finite if self._finite is not None else self._gradients_finite()
        self.step += 1
        for layer in self.layers.values():
            layer.state("step").fill_(self.step)
        self.hook.equirelax_after_optimizer_step(handle=self, finite=finite)
        self._finite = None
        self._clear_step()

    def _clear_step(self):
        for layer in self.layers.values():
            layer.clear_step_cache()

    def epoch_end(self):
        """Call once after each training epoch (schedules advance; skipped steps are reported)."""
        self.epoch += 1
        for layer in self.layers.values():
            layer.state("epoch").fill_(self.epoch)
        self.hook.equirelax_epoch_end(handle=self, epoch=self.epoch)
        skipped = int(self._first().state("nonfinite"))
        if skipped > self._reported_nonfinite:
            warnings.warn(
                f"equirelax: {skipped - self._reported_nonfinite} training step(s) had a non-finite loss or "
                f"gradient (NaN/inf); the controller skipped them (its γ/λ/state are unchanged by those steps)",
                RuntimeWarning,
                stacklevel=2,
            )
            self._reported_nonfinite = skipped

    def resync(self, epoch: int | None = None):
        """Re-read Python-side state from the layers' buffers (after a host loaded a checkpoint into the model)."""
        self.epoch = int(self._first().state("epoch")) if epoch is None else int(epoch)
        self.step = int(self._first().state("step"))
        self._reported_nonfinite = int(self._first().state("nonfinite"))
        self.hook.equirelax_load_state_dict(handle=self, state={})

    # ------------------------------------------------------------------ modes
    @contextlib.contextmanager
    def mode(self, mode: str):
        """Temporarily evaluate the model as ``"projected"`` (branch replaced by its exact equivariant part
        P(branch), the model ``export`` returns; MLP branches have none and are dropped),
        ``"equivariant"`` (γ := 0) or ``"relaxed"``."""
        previous = {name: layer.mode for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.set_mode(mode)
        try:
            yield self.model
        finally:
            for name, layer in self.layers.items():
                layer.set_mode(previous[name])

    def projected(self):
        return self.mode("projected")

    def equivariant(self):
        return self.mode("equivariant")

    def set_positions(self, positions: torch.Tensor | None):
        """Raw Cartesian positions (rows matching the layers' feature rows) for position-fed branches."""
        for layer in self.layers.values():
            if layer.uses_positions:
                layer.set_positions(positions)

    def set_samples(self, samples: torch.Tensor | None):
        """The sample each row of the model's next training inputs belongs to (integer ids, e.g. dataset
        indices, along the first axis of the relaxed layers' inputs; None: read them off the inputs). RECM
        gives each sample to one of its two probe maps by its id; without ids it hashes each sample's raw
        input (a host batch's structures, a plain input's rows), which samples with identical inputs share.
        Set it before every training forward; other controllers ignore it."""
        if samples is not None and (not torch.is_tensor(samples) or samples.dtype.is_floating_point
                                    or samples.dim() != 1):
            raise ValueError("equirelax: set_samples takes a 1-D integer tensor of sample ids (one per row), "
                             f"got {samples!r:.80}")
        if self._sample_split is not None:
            self._sample_split.samples = samples

    # ------------------------------------------------------------------ state
    def signature(self) -> dict:
        return {
            "controller": self.controller.name,
            "branch": self.config["branch"],
            "layers": sorted(self.layers),
        }

    def signature_differences(self, state: dict) -> list[str]:
        """What differs between a saved relax signature (``state_dict()``) and this handle's, one line each."""
        mine = self.signature()
        return [f"{key}: checkpoint has {state.get(key)!r}, this model has {mine[key]!r}"
                for key in mine if state.get(key) != mine[key]]

    def state_dict(self) -> dict:
        """γ and all controller state of every layer, plus the relax configuration."""
        layers = {}
        for name, layer in self.layers.items():
            entry = {"gamma": layer.gamma.detach().clone()}
            for key, buf in layer.named_buffers(recurse=False):
                if key.startswith("ctrl_"):
                    entry[key] = buf.detach().clone()
            layers[name] = entry
        extra = {}
        for part in self.hook.equirelax_state_dict(handle=self):
            extra.update(part or {})
        return {
            "format": STATE_FORMAT,
            **self.signature(),
            "options": dict(self.controller.options),
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "reported_nonfinite": self._reported_nonfinite,
            "layer_state": layers,
            "extra": extra,
        }

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("equirelax: not an equirelax controller state (missing or unknown 'format')")
        differences = self.signature_differences(state)
        if differences:
            raise ValueError("equirelax: incompatible controller state; " + "; ".join(differences))
        with torch.no_grad():
            for name, entry in state["layer_state"].items():
                layer = self.layers[name]
                layer.gamma.copy_(entry["gamma"])
                for key, value in entry.items():
                    if key == "gamma":
                        continue
                    buf = layer._buffers.get(key)
                    if buf is None or buf.shape != value.shape:
                        raise ValueError(f"equirelax: incompatible controller state for layer {name!r} ({key})")
                    buf.copy_(value)
        self.controller.options = dict(state["options"])
        self.epoch = int(state["epoch"])
        self.step = int(self._first().state("step"))
        if "total_steps" in state:
            self.set_total_steps(state["total_steps"])
        self._reported_nonfinite = int(state.get("reported_nonfinite", 0))
        self.hook.equirelax_load_state_dict(handle=self, state=state.get("extra", {}))

    def __repr__(self):
        return f"RelaxHandle(controller={self.controller.name!r}, layers={sorted(self.layers)})"
