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
