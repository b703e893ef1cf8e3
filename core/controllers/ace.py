"""ACE: adaptive constrained equivariance (Manolache, Chamon, Niepert, NeurIPS 2025).

One learnable γ_i per layer and a dual variable λ_i. The Lagrangian is
J(θ, γ) + Σ λ_i γ_i (equality: the model must end equivariant) or, resilient,
J + Σ λ_i(|γ_i| − u_i) + (ρ/2)‖u‖² (partial symmetry: γ keeps a slack u_i).

Default dynamics (``dual="budget"``): the primal step on γ is split. The host
optimizer applies the task gradient ∂J/∂γ; the controller then takes the
proximal step of the constraint terms (multiplier plus an augmented term) in
γ's own units, and ascends λ:

    z   = γ − u                       (equality: u = 0, λ free sign; resilient: on |γ|, λ ≥ 0)
    λ  ← λ + k_i z                    (resilient: [·]_+)
    z  ← (z − λ)/(1 + c)              (augmented proximal step; resilient: c acts on z > 0 only)

What the proximal step takes off γ goes, in the equality form's default, with the whole
branch: the host layers are left to the optimizer. With ``keep_equivariant_part=True`` (the
resilient form's default) the branch's equivariant part
goes instead into the host layer's own weights (Δγ·P(W), exactly, where the adapter can
merge), so shrinking γ removes only the symmetry-breaking part and the equivariant function
the branch learned stays, as ``export(mode="merge")`` would keep it. Dropping is equality
ACE's default by measurement (BENCHMARKS.md, horizon 0.1); the resilient form, measured only
with its part kept, keeps it. Where the data breaks the symmetry, keeping
costs: SevenNet-0's 40-step fine-tune on field data ends at 292.7 meV/Å kept against 217.0
dropped (vanilla 183.6), the e3nn field task at test MSE 0.181 against 0.151 (vanilla 0.150);
the Haar projection of a branch that learned the field is not an equivariant fit the data
asks for. On symmetric data neither wins throughout, and the margins are small: keeping is
better on the e3nn task (1.48e-3 against 1.64e-3, vanilla 2.04e-3) and the N-body e3nn model
(1.42e-2 against 1.48e-2, seed 0), dropping on SevenNet-0 (131.5 against 142.7 meV/Å); the
MACE fine-tunes are level within their spread.

This is a primal–dual (PI) loop on the constraint violation whose gains come
from the run's budget T: a double pole at r = 1 − 1/N_t with the horizon
N_t = 1 + horizon·(T − t) shrinking with the steps left, i.e. 1/(1+c) = r²,
k_i = (1 − r)²/r² (critically damped: no oscillation); at the budget's last
step r = 0 and the constraint closes exactly. Why: the host optimizer
moves γ by about its learning rate per step (Adam), so dual terms that only
enter γ's gradient need ≳ 1/lr steps to act (1000 at lr 1e-3, more than a
75-step fine-tune) and, undamped, oscillate for tens of thousands of steps
(measured in BENCHMARKS.md). The split acts at any learning rate and loss
scale, lets γ follow the task early (a long horizon) and ends at γ ≈ 0.

Default horizon by form. γ's time constant at the start is about
horizon·T/2 steps. Equality (0.1): γ is near 0 a quarter into the budget, and the
equivariant model trains on its own for the rest. With 0.5, γ decayed over the
whole budget. In N-body training for 317 epochs (SEGNN-style model, MLP branches,
seeds 0 and 1) the equivariant model then ended with test MSE 1.19e-2 and 1.28e-2,
against 8.17e-3 and 7.80e-3 with 0.1 and vanilla's 7.99e-3 and 7.30e-3. Resilient (0.5): its slack is estimated over the
horizon, and it hands over the relaxed model. In the 75-step MACE fine-tune of
``make demo``, 0.1 raised its relaxed force MAE on field data from 70.9 to 75.9 meV/Å.

Resilient slack: u_i = min(1, κ_i/ρ), κ_i ∈ [0, 1] the consistency with which
the task gradient asks to grow the branch's symmetry-breaking part (noise-
debiased EMA mean over RMS, over the same horizon, of ⟨∂J/∂W, P⊥W⟩/γ for a
linear branch, of ∂J/∂γ_i for an MLP one; for a low-rank branch the same
number, ∂J/∂γ less the host weights' gradient along P(W) where the host layer
takes P(W) exactly (no extra work in the step), else read from zero leaves the
layer adds on training steps: ``RelaxedLayer.tapped_branch``): the paper's
equilibrium |γ| = |∂J/∂γ|/ρ with ρ measured against the gradient's own scale, so one ρ works for any loss
scale.

``dual="gradient"`` is the papers' form, for reproducing the reference: the
dual terms enter γ's gradient (λ, or λ·sign γ), λ ← λ + η_d γ (resilient:
[λ + η_d(|γ| − u)]_+ with u = λ/ρ), optional augmented weight c.
"""

from __future__ import annotations

import torch

from ..branches import LinearBranch, LowRankBranch
from ..distributed import all_reduce_
from ..hookspecs import hookimpl
from .base import Controller

FORMS = ("equality", "resilient")
HORIZONS = {"equality": 0.1, "resilient": 0.5}   # the default horizon per form (see the module docstring)
KEEP_EQUIVARIANT_PART = {"equality": False, "resilient": True}  # the default per form (ditto)
DUALS = ("budget", "gradient")


class ACE(Controller):
    name = "ace"
    defaults = {"form": "equality", "dual": "budget", "horizon": None, "rho": 1.0, "gamma0": 1.0,
                "dual_lr": 1e-3, "augmented": 0.0, "keep_equivariant_part": None}
    learnable_gamma = True

    def validate(self):
        if self.options["form"] not in FORMS:
            raise ValueError(f"equirelax: ace option 'form' must be one of {FORMS}, got {self.options['form']!r}")
        if self.options["dual"] not in DUALS:
            raise ValueError(f"equirelax: ace option 'dual' must be one of {DUALS}, got {self.options['dual']!r}")
        if self.options["horizon"] is None:
            self.options["horizon"] = HORIZONS[self.options["form"]]
        self._positive("dual_lr", "rho", "horizon")
        self._positive("augmented", allow_zero=True)
        if self.options["keep_equivariant_part"] is None:
            self.options["keep_equivariant_part"] = KEEP_EQUIVARIANT_PART[self.options["form"]]
        if not isinstance(self.options["keep_equivariant_part"], bool):
            raise ValueError("equirelax: ace option 'keep_equivariant_part' must be true or false, got "
                             f"{self.options['keep_equivariant_part']!r}")

    def initial_gamma(self) -> float:
        return float(self.options["gamma0"])

    @property
    def resilient(self) -> bool:
        return self.options["form"] == "resilient"

    @property
    def budgeted(self) -> bool:
        return self.options["dual"] == "budget"

    @property
    def reads_consistency(self) -> bool:
        """Whether the slack comes from the task gradient's consistency (the resilient budget form)."""
        return self.resilient and self.budgeted

    def setup(self, layers):
        self._build_plans(layers)
        for layer in layers.values():
            layer.add_state("lambda", torch.zeros((), dtype=layer.gamma.dtype))
            if self.resilient:
                layer.add_state("slack", torch.zeros((), dtype=layer.gamma.dtype))
                # EMA of the task gradient on γ and of its square, and the EMA's bias-correction weight
                layer.add_state("grad_mean", torch.zeros((), dtype=layer.gamma.dtype))
                layer.add_state("grad_sq", torch.zeros((), dtype=layer.gamma.dtype))
                layer.add_state("grad_weight", torch.zeros((), dtype=layer.gamma.dtype))

    def _build_plans(self, layers):
        # built here, not in the training step (building reads the host layer's path factors on the host)
        keep = self.budgeted and self.options["keep_equivariant_part"]
        read = self.reads_consistency
        hosts = {name: self.adapter.merge_plan(layer) if (keep or read) and layer.has_projection else None
                 for name, layer in layers.items()}
        self.plans = {name: plan if keep else None for name, plan in hosts.items()}
        # a low-rank branch has no ∂J/∂W of its own: ⟨∂J/∂W, P(W)⟩ is read off the host layer's weight gradient
        # where a plan maps the equivariant part onto those weights, else the layer adds zero leaves to read it
        self.readers = {name: plan if read and isinstance(layers[name].branch, LowRankBranch)
                        and hasattr(plan, "gradient_along") else None for name, plan in hosts.items()}
        self._choose_taps()

    def _choose_taps(self):
        for name, layer in self.layers.items():
            reader = self.readers.get(name)
            layer.tap_gradient = self.reads_consistency and isinstance(layer.branch, LowRankBranch) and (
                reader is None or not reader.linear.weight.requires_grad)  # (a frozen host layer has no gradient)

    # ------------------------------------------------------------- budget form
    def _gains(self, handle):
        """(r², k_i, EMA rate) for this step from the steps left in the budget."""
        total = handle.require_total_steps("ace (dual='budget')")
        left = max(total - handle.step, 0)
        r = 1.0 - 1.0 / (1.0 + self.options["horizon"] * left)
        rate = 1.0 / (2.0 + self.options["horizon"] * total)
        if r == 0.0:  # the budget's last step (and any beyond it): the constraint closes exactly, λ is kept
            return 0.0, 0.0, rate
        return r * r, (1.0 - r) ** 2 / (r * r), rate

    @staticmethod
    def _task_gradient(layer, reader=None):
        """∂J/∂γ (before any dual term), along the branch's non-equivariant part where the branch is a linear map:
        ⟨∂J/∂W, P⊥W⟩/γ (∂J/∂W = γ·Σδxᵀ); None when the step left no gradient. A low-rank branch: ⟨H, P⊥W⟩,
        H the gradient on the map the layer adds, as ∂J/∂γ − ⟨H, P(W)⟩ with ⟨H, P(W)⟩ the host weights'
        gradient along P(W) (``reader``: the host layer takes P(W) exactly, and H is its map's gradient too),
        or from the layer's zero leaves."""
        if isinstance(layer.branch, LinearBranch):
            weight = layer.branch.weight
            if weight.grad is not None:
                gamma = layer.gamma.detach()
                safe = torch.where(gamma.abs() > 1e-6, gamma, torch.full_like(gamma, 1e-6))
                return (weight.grad.detach() * layer.projector.orthogonal_complement(weight.detach())).sum() / safe
        tap, layer.tapped = layer.__dict__.get("tapped") or {}, None  # a low-rank branch: RelaxedLayer.tapped_branch
        branch = layer.branch
        if not tap and reader is not None and layer.gamma.grad is not None:
            along_equivariant = reader.gradient_along(
                layer.projector.lowrank_coefficients(branch.B.detach(), branch.A.detach()))
            if along_equivariant is None:
                return None
            return layer.gamma.grad.detach().reshape(()) - along_equivariant.to(layer.gamma.grad.dtype)
        if "dense" in tap and tap["dense"].grad is not None:  # ⟨H, P⊥W⟩
            return (tap["dense"].grad * layer.projector.orthogonal_complement(branch.weight.detach())).sum()
        if "shift" in tap and tap["shift"].grad is not None:  # ⟨H, W⟩ − ⟨H, P(W)⟩
            along_equivariant = sum(
                ((block.grad * coefficients).sum() for block, coefficients in
                 zip(tap["blocks"], layer.projector.lowrank_coefficients(branch.B.detach(), branch.A.detach()))
                 if block.grad is not None), torch.zeros_like(tap["shift"].grad))
            return tap["shift"].grad - along_equivariant
        return None if layer.gamma.grad is None else layer.gamma.grad.detach()

    def _update_consistency(self, layers, finite, rate):
        """Record each layer's task gradient on γ into its consistency EMAs."""
        tapped = [name for name, layer in layers.items() if layer.__dict__.get("tapped")]
        grads = {name: self._task_gradient(layer, self.readers.get(name)) for name, layer in layers.items()}
        grads = {name: g for name, g in grads.items() if g is not None}
        if not grads:
            return
        tapped = [name for name in tapped if name in grads]
        if tapped:  # a tapped ∂J/∂W is this rank's own (a parameter's gradient is averaged already)
            values = [torch.stack([grads[name].reshape(()) for name in tapped])]
            all_reduce_(values)
            grads.update(zip(tapped, values[0].unbind()))
        names = list(grads)
        gammas = torch.stack([layers[name].gamma for name in names])  # (under no_grad)
        g = -torch.stack([grads[name].reshape(()) for name in names]) * torch.sign(gammas)  # > 0: |γ| should grow
        for key, value in (("grad_mean", g), ("grad_sq", g * g), ("grad_weight", torch.ones_like(g))):
            state = self.stacked(key, names)
            self.write_back(key, self.keep_if(finite, (1 - rate) * state + rate * value, state), names)

    @staticmethod
    def consistency(weight, mean_sum, square_sum, rate) -> torch.Tensor:
        """κ ∈ [0, 1] per layer from the stacked EMA states ``grad_weight``, ``grad_mean`` and ``grad_sq``: the EMA
        mean of the outward task gradient over its RMS, less the noise an EMA keeps."""
        weight = weight.clamp(min=1e-12)
        mean, sq = mean_sum / weight, square_sum / weight
        noise = rate / (2 - rate)  # variance fraction an EMA of i.i.d. zero-mean terms keeps
        excess = torch.clamp(mean.abs().pow(2) - noise * sq, min=0) * (mean > 0)
        return torch.sqrt(excess / sq.clamp(min=torch.finfo(sq.dtype).tiny)).clamp(max=1.0)

    def _budget_step(self, handle, finite):
        r2, k_i, rate = self._gains(handle)
        with torch.no_grad():  # every layer at once
            gamma = torch.stack([layer.gamma for layer in self.layers.values()])
            lam = self.stacked("lambda")
            if self.resilient:
                kappa = self.consistency(self.stacked("grad_weight"), self.stacked("grad_mean"),
                                         self.stacked("grad_sq"), rate)
                old_slack = self.stacked("slack")
                slack = self.keep_if(finite, torch.clamp(kappa / self.options["rho"], max=1.0), old_slack)
                self.write_back("slack", slack)
                z = gamma.abs() - slack
                new_lam = torch.clamp(lam + k_i * z, min=0)
                new_z = torch.where(z > 0, r2 * (z - new_lam), z - new_lam)
                new_gamma = torch.sign(gamma) * torch.clamp(slack + new_z, min=0)
            else:
                new_lam = lam + k_i * gamma
                new_gamma = r2 * (gamma - new_lam)
            self.write_back("lambda", self.keep_if(finite, new_lam, lam))
            new_gamma = self.keep_if(finite, new_gamma.to(gamma.dtype), gamma)
            given_up = gamma - new_gamma
            for index, (name, layer) in enumerate(self.layers.items()):
                plan = self.plans[name]
                if plan is not None:  # the equivariant part of what γ gives up moves into the host layer
                    branch = layer.branch
                    if isinstance(branch, LowRankBranch) and hasattr(plan, "add_coefficients"):  # (not forming B·A)
                        plan.add_coefficients(layer.projector.lowrank_coefficients(
                            given_up[index] * branch.B.detach(), branch.A.detach()))
                    else:
                        kept = layer.equivariant_weight(branch.weight.detach())[:, : layer.feature_dim]
                        plan(given_up[index] * kept)
            torch._foreach_copy_([layer.gamma for layer in self.layers.values()], list(new_gamma.unbind()))

    # ------------------------------------------------------------------- hooks
    @hookimpl
    def equirelax_after_backward(self, handle, finite):
        if self.budgeted:
            handle.require_total_steps("ace (dual='budget')")  # before the optimizer steps, not after
            if self.resilient:
                rate = self._gains(handle)[2]
                with torch.no_grad():
                    self._update_consistency(self.layers, finite, rate)
            return
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
        if self.budgeted:
            self._budget_step(handle, finite)
            self._choose_taps()
            return
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
    def equirelax_load_state_dict(self, handle, state):
        # the options came back with the state: a state saved before the option existed was trained keeping it
        self.options.setdefault("keep_equivariant_part", True)
        self._build_plans(self.layers)

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
