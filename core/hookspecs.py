"""Hook specifications: the points where a controller meets a training loop.

A trainer integration (a plain PyTorch loop through ``handle.wrap(optimizer)``,
MACE's or NequIP's trainer through ``equirelax.plugins``) calls these hooks; a
controller, or any other plugin registered on ``handle.plugins``, implements
them with ``@hookimpl``. Third-party hook implementations are discovered
through the entry-point group ``equirelax``.
"""

import pluggy

PROJECT = "equirelax"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def equirelax_model_patched(handle, layers):
    """The model was patched: ``layers`` maps names to RelaxedLayer. Set up state here."""


@hookspec
def equirelax_after_backward(handle, finite):
    """Gradients are ready and the optimizer has not stepped yet.

    ``finite`` is a 0-dim bool tensor on the model's device (no host sync): false
    when the loss or a relaxed gradient was NaN/inf. Edit ``.grad`` here.
    """


@hookspec
def equirelax_after_optimizer_step(handle, finite):
    """The optimizer has stepped: dual and modulation updates go here."""


@hookspec
def equirelax_epoch_end(handle, epoch):
    """An epoch ended; ``epoch`` is the number of epochs completed."""


@hookspec
def equirelax_state_dict(handle):
    """Return a dict of extra state to save (merged into ``handle.state_dict()``)."""


@hookspec
def equirelax_load_state_dict(handle, state):
    """Restore extra state saved by ``equirelax_state_dict``."""


@hookspec
def equirelax_metrics(handle):
    """Return a flat dict of scalars to log (may synchronise with the device)."""
