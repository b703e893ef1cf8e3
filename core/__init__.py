"""Host-agnostic engine: relaxed layers, branches, projection, metrics, controllers, hooks."""

from .branches import LinearBranch, LowRankBranch, MLPBranch, make_branch
from .controllers import ACE, CR, RECM, ACEResilient, Controller, Fixed, available_controllers, get_controller
from .handle import RelaxHandle
from .patching import export, relax
from .hookspecs import hookimpl, hookspec
from .irreps import so3_generators
from .layer import RelaxedLayer
from .metrics import EquivarianceError, equivariance_error, symmetry_breaking
from .projection import HaarProjector, mc_project

__all__ = [
    "ACE", "ACEResilient", "CR", "RECM", "Fixed", "Controller", "available_controllers", "get_controller",
    "EquivarianceError", "HaarProjector", "LinearBranch", "LowRankBranch", "MLPBranch", "RelaxHandle", "RelaxedLayer",
    "equivariance_error", "export", "hookimpl", "hookspec", "make_branch", "mc_project", "relax",
    "so3_generators", "symmetry_breaking",
]
