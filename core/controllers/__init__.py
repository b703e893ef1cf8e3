"""Built-in controllers and discovery of third-party ones (entry-point group ``equirelax.controllers``)."""

from __future__ import annotations

from importlib.metadata import entry_points

from .ace import ACE, ACEResilient
from .base import Controller
from .cr import CR, check_schedule_fits, cr_schedule, lie_derivative_terms
from .fixed import Fixed
from .recm import RECM

BUILTIN = {cls.name: cls for cls in (Fixed, CR, ACE, ACEResilient, RECM)}
ENTRY_POINT_GROUP = "equirelax.controllers"


def available_controllers() -> dict:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep
    return found


def get_controller(name_or_controller, **options) -> Controller:
    """A controller instance from a name (built-in or entry point), a class, or an instance."""
    if isinstance(name_or_controller, Controller):
        if options:
            raise TypeError("equirelax: options were given next to an already constructed controller")
        return name_or_controller
    if isinstance(name_or_controller, type) and issubclass(name_or_controller, Controller):
        return name_or_controller(**options)
    found = available_controllers()
    if name_or_controller not in found:
        raise ValueError(
            f"equirelax: unknown controller {name_or_controller!r}; available: {sorted(found)} "
            f"(third-party controllers register under the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    cls = found[name_or_controller]
    if not isinstance(cls, type):
        cls = cls.load()
    return cls(**options)


__all__ = ["ACE", "ACEResilient", "CR", "RECM", "Fixed", "Controller", "get_controller", "available_controllers",
           "check_schedule_fits", "cr_schedule", "lie_derivative_terms", "BUILTIN"]
