"""A relaxed SevenNet model as a plain SevenNet checkpoint.

SevenNet's tools (``SevenNetCalculator``, ``sevenn_get_model``, ``train.continue``)
rebuild the model from the checkpoint's config and load its state dict strictly,
so the branches are merged (or dropped) first: the written checkpoint is the
base checkpoint with the exported model's weights, under SevenNet's own names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ...core.patching import export

# what a fresh fine-tuning must not resume: the base run's optimizer and schedule
TRAINING_STATE = ("optimizer_state_dict", "scheduler_state_dict", "epoch")


def export_checkpoint(model: torch.nn.Module, base_checkpoint, out, mode: str = "merge") -> Path:
    """Write ``model`` (relaxed or already exported), branches merged or dropped, as a SevenNet checkpoint at
    ``out``, with the config and metadata of ``base_checkpoint`` (a path or a pretrained name such as ``7net-0``,
    the checkpoint the model was built from)."""
    import sevenn
    from sevenn.util import load_checkpoint

    base = load_checkpoint(str(base_checkpoint))
    exported = export(copy.deepcopy(model), mode=mode) if _relaxed(model) else copy.deepcopy(model)
    state = exported.state_dict()
    expected = base.model_state_dict
    missing = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    if missing:
        raise ValueError(f"equirelax: the exported model's weights do not match the layout of {base_checkpoint} "
                         f"(e.g. {missing[:5]}); give the checkpoint the model was built from")
    # sevenn's own way to write a variant of a checkpoint: its config as this sevenn reads it (old ones patched)
    checkpoint = base.get_checkpoint_dict()
    # the checkpoint's own keys only (a built model also holds e3nn's generated constants, which SevenNet rebuilds)
    checkpoint["model_state_dict"] = {k: state[k].detach().cpu().clone() for k in expected}
    # the weights are in this sevenn's layout (an older checkpoint's convolution weights were re-sorted on
    # loading), so the checkpoint says so, as sevenn's own rewrites do
    checkpoint["config"] = {**checkpoint["config"], "version": sevenn.__version__}
    for key in TRAINING_STATE:
        checkpoint.pop(key, None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def _relaxed(model) -> bool:
    from ...core.layer import RelaxedLayer

    return any(isinstance(m, RelaxedLayer) for m in model.modules())


def frozen_model(relaxed_checkpoint):
    """SevenNet's model of a relaxed checkpoint (``checkpoint_best_relaxed.pth``) with each relaxed layer frozen
    (``export(mode="freeze")``: γ and branches kept as plain torch parts), every weight of the checkpoint loaded
    (a missing or unknown key is an error). The relaxed layers and the branch kind are read from its own keys."""
    from sevenn.model_build import build_E3_equivariant_model
    from sevenn.util import load_checkpoint

    from ...core.branches import saved_branch_kind
    from ...core.patching import relax

    checkpoint = load_checkpoint(str(relaxed_checkpoint))
    state = checkpoint.model_state_dict
    layers = sorted(key[: -len(".gamma")] for key in state if key.endswith(".gamma"))
    if not layers:
        raise ValueError(f"equirelax: {relaxed_checkpoint} holds no relaxed layer (no γ): it is a plain SevenNet "
                         "checkpoint, which sevenn_get_model deploys as it is")
    prefix = f"{layers[0]}.branch."
    branch = saved_branch_kind(key[len(prefix):] for key in state if key.startswith(prefix)) or "linear"
    options = {"rank": state[f"{prefix}A"].shape[0]} if branch == "lowrank" else {}
    model = build_E3_equivariant_model(checkpoint.config)
    relax(model, "fixed", targets=layers, branch=branch, adapter="sevenn", **options)
    export(model, mode="freeze")
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "._compiled_main" not in k]  # e3nn's generated constants, rebuilt
    if missing or unexpected:
        raise ValueError(f"equirelax: {relaxed_checkpoint} does not fit the model its config builds "
                         f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return model, checkpoint


def deploy_relaxed(relaxed_checkpoint, out="deployed_serial_relaxed.pt", modal=None) -> Path:
    """The relaxed model of ``relaxed_checkpoint`` as sevenn deploys for LAMMPS (``sevenn_get_model``'s serial
    TorchScript, with its metadata), γ and branches kept: sevenn's own ``deploy``, given the frozen model."""
    from unittest import mock

    from sevenn.checkpoint import SevenNetCheckpoint
    from sevenn.scripts.deploy import deploy

    model, checkpoint = frozen_model(relaxed_checkpoint)
    with mock.patch("sevenn.scripts.deploy.load_checkpoint", lambda _: checkpoint), \
            mock.patch.object(SevenNetCheckpoint, "build_model", lambda self, **_: model):
        deploy(str(relaxed_checkpoint), fname=str(out), modal=modal)
    return Path(out if str(out).endswith(".pt") else f"{out}.pt")
