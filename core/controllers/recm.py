"""RECM: recurrent equivariant constraint modulation (after Pertigkiozoglou et al., ICML 2026).

This is equirelax's formulation of RECM's principle (the published update rule
is not reproduced here): each layer's level is driven by a recurrent state
estimated from the training signal, and settles at a value bounded by the
symmetry gap that layer sees; no target level is given.

Probing steps. Every ``probe_every``-th training step runs the relaxed layers'
equivariant part alone (branches off, γ untouched) and records, for each layer,
G_i = ∂L/∂W of a *virtual* linear branch (a zero matrix added to the layer's
output: its gradient is Σ δ xᵀ). This is the gradient a non-equivariant map
would get at the *equivariant* model, so it does not vanish once the real
branch has fitted a broken symmetry, and it does not depend on γ or on the
branch's scale. Under a rotation-invariant input distribution and an
equivariant target its non-equivariant part P⊥G_i has zero mean.

State (m_i, v_i, n_i), EMAs with rate β over probing steps, bias-corrected:
    m ← βm + (1−β)P⊥G      v ← βv + (1−β)‖P⊥G‖²      n ← βn + (1−β)‖G‖²
Gap estimate, debiased for the noise an EMA of zero-mean terms keeps
(c_t = (1−β)(1+β^t) / ((1+β)(1−β^t)): 1 at t = 1, (1−β)/(1+β) as t → ∞):
    s² = max(0, ‖m̂‖² − c_t v̂) / (n̂ + ε)       (s ∈ [0, 1]; see below for the finite-set term)
Modulation, a contraction with fixed point min(1, s/τ):
    γ ← clip[(1−α)γ + α·min(1, ŝ/τ), 0, 1]
where ŝ = sign(s²)·√|s²| uses the debiased s² *before* clipping at 0, so the
zero-mean noise of the estimate averages out in γ instead of biasing it up.
so once s_i settles, γ_i converges to min(1, s_i/τ): bounded by the gap, and
→ 0 where the layer's input–target distribution is symmetric.

A finite training set is never exactly symmetric: its orientation sampling
leaves a gap of its own, which the EMA over many epochs converges to (and which
a model can overfit). An epoch of K steps partitions the training set into K
batches, so that gap has expected size σ²/K, where σ² = v̂ − ‖m̂‖² is the
spread of one batch's P⊥G about the mean. It is subtracted as well, so that γ
follows the gap of the data *distribution*:
    s² = max(0, ‖m̂‖² − c_t v̂ − (v̂ − ‖m̂‖²)/K) / (n̂ + ε)
K is counted between ``epoch_end`` calls. The term is applied with
``finite_sample_correction: true`` (off by default: it needs several batches
per epoch, and with one it has no spread to measure) and once an epoch has ended.
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_
from ..hookspecs import hookimpl
from .base import Controller


class RECM(Controller):
    name = "recm"
    defaults = {"beta": 0.98, "alpha": 0.02, "tau": 1.0, "probe_every": 4, "eps": 1e-20,
                "gamma0": 1.0, "finite_sample_correction": False}
    needs_probe = True

    def validate(self):
        for key in ("beta", "alpha"):
            value = self.options[key]
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"equirelax: recm option {key!r} must be in (0, 1), got {value!r}")
        self._positive("tau", "eps")
        every = self.options["probe_every"]
        if not isinstance(every, int) or isinstance(every, bool) or every < 2:
            raise ValueError(f"equirelax: recm option 'probe_every' must be an integer >= 2, got {every!r}")
        if not isinstance(self.options["finite_sample_correction"], bool):
            raise ValueError("equirelax: recm option 'finite_sample_correction' must be true or false, got "
                             f"{self.options['finite_sample_correction']!r}")
        if not 0 <= self.options["gamma0"] <= 1:
            raise ValueError(f"equirelax: recm option 'gamma0' must be in [0, 1], got {self.options['gamma0']!r}")

    def initial_gamma(self) -> float:
        return float(self.options["gamma0"])

    def setup(self, layers):
        for layer in layers.values():
            d_out, d_in = layer.irreps_out.dim, layer.branch_irreps_in.dim
            layer.add_state("m", torch.zeros(d_out, d_in, dtype=layer.gamma.dtype))
            layer.add_state("v", torch.zeros((), dtype=layer.gamma.dtype))
            layer.add_state("n", torch.zeros((), dtype=layer.gamma.dtype))
            layer.add_state("t", torch.zeros((), dtype=layer.gamma.dtype))
            layer.add_state("gap", torch.zeros((), dtype=layer.gamma.dtype))
            layer.add_state("steps", torch.zeros((), dtype=torch.long))
            # optimizer steps in the last finished epoch (0: none finished yet) and the step count at its end
            layer.add_state("epoch_steps", torch.zeros((), dtype=torch.long))
            layer.add_state("epoch_start", torch.zeros((), dtype=torch.long))
        self.steps = 0
        self._set_probing()

    def _set_probing(self):
        probing = (self.steps + 1) % self.options["probe_every"] == 0
        for layer in self.layers.values():
            layer.probing = probing
            layer.use_probe = probing

    @hookimpl
    def equirelax_after_optimizer_step(self, handle, finite):
        self.steps += 1
        for layer in self.layers.values():
            layer.state("steps").fill_(self.steps)
        self._set_probing()

    @hookimpl
    def equirelax_epoch_end(self, handle, epoch):
        for layer in self.layers.values():
            start, count = layer.state("epoch_start"), layer.state("epoch_steps")
            done = layer.state("steps") - start
            count.copy_(torch.where(done > 0, done, count))
            start.copy_(layer.state("steps"))

    @hookimpl
    def equirelax_load_state_dict(self, handle, state):
        self.steps = int(next(iter(self.layers.values())).state("steps"))
        self._set_probing()

    @hookimpl
    def equirelax_after_backward(self, handle, finite):
        beta, alpha, tau, eps = (self.options[k] for k in ("beta", "alpha", "tau", "eps"))
        with torch.no_grad():
            measured = {}
            for name, layer in self.layers.items():
                if not layer.probing:
                    continue
                grads = [p.grad for p in layer.probes if p.grad is not None]
                if grads:
                    G = grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)
                    measured[name] = G.to(layer.gamma.dtype)
            # data parallel: the probe gradient of the global batch, as DDP averages the parameters' gradients
            all_reduce_(list(measured.values()))
            for name, G in measured.items():
                layer = self.layers[name]
                Q = layer.projector.orthogonal_complement(G)
                m, v, n, t = (layer.state(k) for k in ("m", "v", "n", "t"))
                t_new = t + 1
                m_new = beta * m + (1 - beta) * Q
                v_new = beta * v + (1 - beta) * Q.pow(2).sum()
                n_new = beta * n + (1 - beta) * G.pow(2).sum()
                correction = 1 - beta**t_new
                noise = (1 - beta) * (1 + beta**t_new) / ((1 + beta) * correction)
                m_hat_sq = m_new.pow(2).sum() / correction**2
                # signed: zero-mean noise in the debiased estimate averages out in γ instead of piling up at 0
                v_hat = v_new / correction
                excess = m_hat_sq - noise * v_hat
                if self.options["finite_sample_correction"]:
                    # the training set's own gap: the mean of K batches' zero-mean spread (K = 0: unknown yet)
                    batches = layer.state("epoch_steps").to(excess.dtype)
                    inverse = torch.where(batches > 0, 1 / batches.clamp(min=1), torch.zeros_like(batches))
                    excess = excess - torch.clamp(v_hat - m_hat_sq, min=0) * inverse
                signed_sq = excess / (n_new / correction + eps)
                signed_gap = torch.sign(signed_sq) * torch.sqrt(signed_sq.abs())
                gap = torch.clamp(signed_gap, min=0)
                target = torch.clamp(signed_gap / tau, max=1.0)
                gamma_new = torch.clamp((1 - alpha) * layer.gamma + alpha * target, 0.0, 1.0)
                for state, new in ((m, m_new), (v, v_new), (n, n_new), (t, t_new), (layer.state("gap"), gap)):
                    state.copy_(self.keep_if(finite, new, state))
                layer.gamma.copy_(self.keep_if(finite, gamma_new, layer.gamma))

    @hookimpl
    def equirelax_metrics(self, handle):
        return {f"recm/gap/{name}": float(layer.state("gap")) for name, layer in self.layers.items()}
