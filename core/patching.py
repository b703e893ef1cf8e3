"""``relax`` puts branches into a model's layers; ``export`` takes them out again (merged or dropped)."""

from __future__ import annotations

import copy
import fnmatch
import warnings

import torch
from torch import nn

from .branches import LINEAR_KINDS, make_branch
from .controllers import get_controller
from .handle import NONFINITE_POLICIES, RelaxHandle
from .irreps import check_group
from .layer import RelaxedLayer
from .samples import remove_sample_split


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[child] = module


def _resolve_targets(model, adapter, targets) -> dict:
    candidates = adapter.candidates(model)
    if targets is None:
        chosen = adapter.default_targets(model)
    else:
        modules = dict(model.named_modules())
        chosen = {}
        for target in targets if isinstance(targets, (list, tuple)) else [targets]:
            if isinstance(target, type):
                matched = {n: m for n, m in candidates.items() if isinstance(m, target)}
                if not matched and not any(isinstance(m, target) for m in modules.values()):
                    raise ValueError(f"equirelax: target type {target.__name__} matches no layer of the model")
                if not matched:
                    raise ValueError(
                        f"equirelax: layers of type {target.__name__} have no irreps information, so no "
                        f"equivariant projection exists for a branch on them; relaxable layers are "
                        f"{sorted(candidates) or 'none'}"
                    )
            elif isinstance(target, str):
                matched = {n: m for n, m in candidates.items() if fnmatch.fnmatchcase(n, target)}
                if not matched and target in modules and target:
                    raise ValueError(
                        f"equirelax: layer {target!r} ({type(modules[target]).__name__}) has no irreps "
                        f"information, so no equivariant projection exists for a branch on it; relaxable "
                        f"layers are {sorted(candidates) or 'none'}"
                    )
            else:
                raise TypeError(f"equirelax: a target is a name pattern or a module type, got {target!r}")
            chosen.update(matched)
        if not chosen:
            raise ValueError(
                f"equirelax: targets {targets!r} matched no relaxable layer; relaxable layers are "
                f"{sorted(candidates) or 'none (the model has no layer the ' + adapter.name + ' adapter knows)'}"
            )
    if "" in chosen:
        raise ValueError(
            "equirelax: the model itself is a single relaxable layer and cannot be replaced in place; "
            "put it in a container (e.g. torch.nn.Sequential(layer)) and relax that"
        )
    # relax the outermost match only: a layer inside another relaxed layer would be wrapped twice
    names = sorted(chosen)
    return {n: chosen[n] for n in names if not any(n.startswith(o + ".") for o in names if o != n)}


def relax(
    model: nn.Module,
    controller="ace",
    targets=None,
    branch: str = "lowrank",
    *,
    adapter="auto",
    init: str = "zero",
    init_std: float = 1e-2,
    group: str = "O3",
    positions: bool = False,
    on_nonfinite: str = "warn",
    rank: int | None = None,
    total_steps: int | None = None,
    **controller_options,
) -> RelaxHandle:
    """Patch ``model`` in place: each target layer becomes ``f_eq(x) + γ·f_neq(x)``.

    controller: ``"fixed"``, ``"cr"``, ``"ace"``, ``"ace-resilient"``, ``"recm"``, an
        entry-point name, or a Controller; ``controller_options`` go to it.
    targets: name pattern(s) (fnmatch, on ``model.named_modules()`` names) and/or
        module types; None relaxes the adapter's default layers.
    branch: ``"lowrank"`` (the default: W = B·A of rank ``rank``, default 8; a few percent
        of a foundation model's parameters), ``"linear"`` (dense: on wide layers several
        times the model's parameters) or ``"mlp"``. ``positions=True`` also feeds raw
        Cartesian positions (see ``RelaxHandle.set_positions``).
    init: ``"zero"`` leaves the model's output unchanged at step 0 (for pretrained
        models); ``"random"`` draws small branch weights (std ``init_std``), as in the papers.
    total_steps: the run's number of optimizer steps. ACE and RECM pace themselves to end
        within it (the MACE and NequIP plugins fill it in); ``handle.set_total_steps`` sets it later.
    """
    from .registry import find_adapter, get_adapter

    if any(isinstance(m, RelaxedLayer) for m in model.modules()):
        raise ValueError("equirelax: this model is already relaxed; export it first or use the existing handle")
    check_group(group)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"equirelax: on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    ctrl = get_controller(controller, **controller_options)
    chosen_adapter = find_adapter(model) if adapter == "auto" else get_adapter(adapter)
    chosen = _resolve_targets(model, chosen_adapter, targets)
    reference = next(model.parameters(), None)
    layers = {}
    for index, (name, module) in enumerate(chosen.items()):
        spec = chosen_adapter.spec(module)
        layer = RelaxedLayer(
            module,
            nn.Identity(),
            arg_irreps=spec.arg_irreps,
            branch_args=spec.branch_args,
            irreps_out=spec.irreps_out,
            gamma=ctrl.initial_gamma(),
            learnable_gamma=ctrl.learnable_gamma,
            group=group,
            uses_positions=positions,
            adapter=chosen_adapter.name,
            mergeable=spec.mergeable,
        )
        branch_options = {} if rank is None else {"rank": rank}
        # a private stream, seeded from the host's seed: the host's own random draws stay as without relaxation
        generator = torch.Generator().manual_seed((torch.initial_seed() + index) % 2**63)
        layer.branch = make_branch(branch, layer.branch_irreps_in.dim, layer.irreps_out.dim, init, init_std,
                                   generator, **branch_options)
        if reference is not None:
            layer.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        _set_submodule(model, name, layer)
        layers[name] = layer
    config = {"branch": branch, "rank": rank, "init": init, "group": group, "positions": positions,
              "on_nonfinite": on_nonfinite, "total_steps": None}
    _warn_if_branches_dwarf_the_model(model, layers, branch)
    handle = RelaxHandle(model, layers, ctrl, chosen_adapter, config)
    handle.set_total_steps(total_steps)
    return handle


LARGE_BRANCHES = 10**6  # below this many branch parameters the dense default costs little, whatever the model


def _warn_if_branches_dwarf_the_model(model, layers, branch):
    """Dense branches on a foundation-sized model hold more parameters than the model (MACE-MP-0-medium's default
    targets: 4.2×, and Adam keeps two more copies); low-rank ones add a few percent and matched dense accuracy in the
    fine-tuning benchmark (BENCHMARKS.md)."""
    if branch == "lowrank":
        return
    added = sum(p.numel() for layer in layers.values() for p in layer.branch.parameters())
    host = sum(p.numel() for p in model.parameters()) - added
    if added > LARGE_BRANCHES and added > host:
        warnings.warn(
            f"equirelax: the {branch} branches add {added / 1e6:.1f}M parameters to a model of {host / 1e6:.1f}M "
            f"({(host + added) / max(host, 1):.1f}× its size); branch='lowrank' (rank 8) adds a few percent and "
            "matched the dense branch's accuracy in MACE fine-tuning (BENCHMARKS.md)",
            UserWarning, stacklevel=3,
        )


EXPORT_MODES = ("merge", "drop")  # equivariant exports: the host's own classes only
DEPLOY_MODE = "freeze"  # the relaxed model as it computes, for deployment


def export(model: nn.Module, mode: str = "merge", *, inplace: bool = True) -> nn.Module:
    """Remove every branch, leaving only the host's own module classes.

    ``mode="merge"`` folds γ·P(W) of each linear branch into the host layer's
    weights (the model stays exactly equivariant and keeps what the branch
    learned that is equivariant); ``mode="drop"`` removes branches (γ := 0).
    Branches that cannot be merged (MLP branches, tensor-product layers) are
    dropped with a warning naming them.

    ``mode="freeze"`` keeps the relaxed model's outputs (γ and branches) but
    freezes each relaxed layer into a small TorchScript-able module of plain
    torch parts (``equirelax.core.frozen``): no controller state, no hooks. Compile
    it the host's way (e3nn ``jit.compile``, ``torch.jit.script``) or package it,
    and the result runs without equirelax.
    """
    from .registry import get_adapter

    if mode == DEPLOY_MODE:
        return _freeze(model if inplace else copy.deepcopy(model))
    if mode not in EXPORT_MODES:
        raise ValueError(f"equirelax: unknown export mode {mode!r}; choose one of {(*EXPORT_MODES, DEPLOY_MODE)}")
    if not inplace:
        model = copy.deepcopy(model)
    remove_sample_split(model)
    relaxed = {n: m for n, m in model.named_modules() if isinstance(m, RelaxedLayer)}
    outermost = {n: m for n, m in relaxed.items() if not any(n.startswith(o + ".") for o in relaxed if o != n)}
    if not relaxed:
        raise ValueError("equirelax: the model has no relaxed layer to export")
    dropped = []
    for name, layer in outermost.items():
        if mode == "merge":
            if isinstance(layer.branch, LINEAR_KINDS) and layer.mergeable:
                with torch.no_grad():
                    weight = layer.gamma.detach() * layer.equivariant_weight(layer.branch.weight.detach())
                    weight = weight[:, : layer.feature_dim]  # raw-position columns are zero after projection
                get_adapter(layer.adapter).merge(layer, weight)
            else:
                dropped.append(name)
        if name:
            _set_submodule(model, name, layer.base)
        else:
            model = layer.base
    if dropped:
        warnings.warn(
            f"equirelax: export could not merge the branches of {dropped} (MLP branches or layers without "
            f"mergeable weights); they were dropped (γ := 0) instead",
            UserWarning,
            stacklevel=2,
        )
    # what relaxation added (layers, branches); models equirelax ships for hosts without a package (EGNN) stay
    leftovers = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("equirelax.core")})
    if leftovers:
        raise RuntimeError(f"equirelax: export left equirelax modules in the model: {leftovers}")
    return model


def _freeze(model: nn.Module) -> nn.Module:
    from .frozen import freeze_layer

    relaxed = {n: m for n, m in model.named_modules() if isinstance(m, RelaxedLayer)}
    if not relaxed:
        raise ValueError("equirelax: the model has no relaxed layer to export")
    remove_sample_split(model)
    for name, layer in relaxed.items():
        if any(name.startswith(o + ".") for o in relaxed if o != name):
            continue
        frozen = freeze_layer(layer)
        if not name:
            return frozen
        _set_submodule(model, name, frozen)
    return model
