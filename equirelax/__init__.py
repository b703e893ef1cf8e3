"""equirelax: relaxed equivariance for e3nn, MACE and NequIP models.

    handle = equirelax.relax(model, controller="ace", targets="*linear*")
    handle.wrap(optimizer)            # controller runs inside optimizer.step()
    ...
    equirelax.export(model, mode="merge")   # back to the host's own classes
"""

from .core import (
    EquivarianceError,
    HaarProjector,
    RelaxedLayer,
    RelaxHandle,
    available_controllers,
    equivariance_error,
    export,
    hookimpl,
    mc_project,
    relax,
    symmetry_breaking,
)

__version__ = "0.1.0"

__all__ = [
    "EquivarianceError", "HaarProjector", "RelaxHandle", "RelaxedLayer", "available_controllers",
    "equivariance_error", "export", "hookimpl", "mc_project", "relax", "symmetry_breaking",
    "__version__",
]
