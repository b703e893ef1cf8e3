"""SevenNet adapter: relax the self-interaction linears of a ``sevenn`` ``AtomGraphSequential`` (SevenNet-0 or a
user's own SevenNet model).

Default targets are each interaction block's ``{t}_self_interaction_1.linear``
(channel mixing of the node features before the convolution) and
``{t}_self_interaction_2.linear`` (mixing of the aggregated messages after it):
SevenNet is NequIP-style, so these are NequIP's ``linear_1``/``linear_2``, the
per-node maps that act on every irrep of the hidden features and keep each
block's irreps. The self-connection linears (a skip path), the embedding and
the readout linears, the convolution's tensor product (its weights come from a
radial network, so it cannot take a merged branch back) and the weightless tensor
product inside the equivariant gate are left out; name them in ``targets`` to
relax the mergeable ones too. Branches start at zero, so step-0 predictions are
SevenNet's, and export merges back into ``o3.Linear``: the exported model has
SevenNet's own parameter names, so its state dict loads into the model SevenNet
builds from the checkpoint's config.
"""

from __future__ import annotations

import fnmatch

from sevenn.nn.sequential import AtomGraphSequential

from .e3nn import E3nnAdapter

DEFAULT_TARGETS = ("*_self_interaction_1.linear", "*_self_interaction_2.linear")


class SevenNetAdapter(E3nnAdapter):
    name = "sevenn"
    positions_key = "pos"  # the batch keys of its data (the atoms' structure index is "batch", as in MACE)

    def matches(self, model):
        return isinstance(model, AtomGraphSequential)

    def candidates(self, model):
        return {name: module for name, module in super().candidates(model).items()
                if "equivariant_gate" not in name}  # the gate's tensor product has no weights

    def default_targets(self, model):
        return {name: module for name, module in self.candidates(model).items()
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in DEFAULT_TARGETS)}
