"""ACE: adaptive constrained equivariance (Manolache, Chamon, Niepert, NeurIPS 2025).

One learnable γ_i per layer (trained by the host optimizer) and a dual variable
λ_i. The dual terms enter as gradients on γ after backward (∇_γ Σλ_iγ_i = λ, or
λ·sign γ in the resilient form), so the host loss is untouched.

equality:   γ ← γ − η_p(∇_γ J + λ)      λ ← λ + η_d γ
resilient:  γ ← γ − η_p(∇_γ J + λ sign γ)
            λ ← [λ + η_d(|γ| − u)]_+     u = λ/ρ
An optional augmented-Lagrangian weight c adds c·γ (equality) or c·(|γ| − u)_+·sign γ
(resilient) to the γ gradient, which damps the primal–dual oscillation.
"""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from .base import Controller

FORMS = ("equality", "resilient")


class ACE(Controller):
    name = "ace"
    defaults = {"form": "equality", "dual_lr": 1e-3, "rho": 1.0, "augmented": 0.0, "gamma0": 1.0}
    learnable_gamma = True

    def validate(self):
        if self.options["form"] not in FORMS:
            raise ValueError(f"equirelax: ace option 'form' must be one of {FORMS}, got {self.options['form']!r}")
        self._positive("dual_lr", "rho")
        self._positive("augmented", allow_zero=True)

    def initial_gamma(self) -> float:
        return float(self.options["gamma0"])

    @property
    def resilient(self) -> bool:
        return self.options["form"] == "resilient"

    def setup(self, layers):
        for layer in layers.values():
            layer.add_state("lambda", torch.zeros(()))
            if self.resilient:
                layer.add_state("slack", torch.zeros(()))

    @hookimpl
    def equirelax_after_backward(self, handle, finite):
        c = self.options["augmented"]
        for layer in self.layers.values():
            gamma = layer.gamma
            lam = layer.state("lambda")
            if self.resilient:
                sign = torch.sign(gamma.detach())
                dual_grad = lam * sign
                if c:
                    dual_grad = dual_grad + c * torch.clamp(gamma.detach().abs() - layer.state("slack"), min=0) * sign
            else:
                dual_grad = lam + c * gamma.detach() if c else lam
            dual_grad = torch.where(finite, dual_grad, torch.zeros_like(dual_grad)).to(gamma.dtype)
            gamma.grad = dual_grad.clone() if gamma.grad is None else gamma.grad + dual_grad

    @hookimpl
    def equirelax_after_optimizer_step(self, handle, finite):
        eta = self.options["dual_lr"]
        with torch.no_grad():
            for layer in self.layers.values():
                gamma = layer.gamma.detach()
                lam = layer.state("lambda")
                if self.resilient:
                    slack = layer.state("slack")
                    new_lam = torch.clamp(lam + eta * (gamma.abs() - slack), min=0)
                    lam.copy_(self.keep_if(finite, new_lam, lam))
                    slack.copy_(lam / self.options["rho"])
                else:
                    lam.copy_(self.keep_if(finite, lam + eta * gamma, lam))

    @hookimpl
    def equirelax_metrics(self, handle):
        metrics = {}
        for name, layer in self.layers.items():
            metrics[f"ace/lambda/{name}"] = float(layer.state("lambda"))
            if self.resilient:
                metrics[f"ace/slack/{name}"] = float(layer.state("slack"))
        return metrics


class ACEResilient(ACE):
    """``ace-resilient``: ACE with the resilient (partial-symmetry) constraint by default."""

    name = "ace-resilient"
    defaults = {**ACE.defaults, "form": "resilient"}
