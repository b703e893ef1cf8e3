"""``fixed``: γ held constant, the plain model-plus-branch baseline."""

from .base import Controller


class Fixed(Controller):
    name = "fixed"
    defaults = {"gamma": 1.0}
    has_step_state = False

    def validate(self):
        if not isinstance(self.options["gamma"], (int, float)):
            raise ValueError(f"equirelax: fixed option 'gamma' must be a number, got {self.options['gamma']!r}")

    def initial_gamma(self) -> float:
        return float(self.options["gamma"])
