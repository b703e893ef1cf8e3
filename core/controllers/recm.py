"""RECM: recurrent equivariant constraint modulation (after Pertigkiozoglou et al., ICML 2026).

This is equirelax's formulation of RECM's principle (the published update rule
is not reproduced here): each layer's level is driven by a recurrent state
estimated from the training signal, and settles at a value bounded by the
symmetry gap that layer sees; no target level is given.

Probe. Each relaxed layer gets two probe maps V_a, V_b of rank ``probe_rank`` (V
= B·A, B starting at zero, so V does too; a low rank keeps them from fitting a
finite training set's own orientations, which a dense map does). Every
``probe_every``-th training step is a probing step (only its training forward: one
under ``no_grad``, or a host's evaluation with its parameters frozen, as MACE
validates in train mode, sees the relaxed model): the layer computes f_eq(x) +
γ·P(W)x + c·P⊥(V)x with c = rms(f_eq(x)) / rms(x), i.e. the branch's
non-equivariant part is replaced by V's (V_a on the rows of one half of the
training samples, V_b on the other's), at full strength whatever γ is (the
branch is not trained on that step; the host model is, as on any step). The V
are RECM's own instrument, not the host's: buffers that RECM trains itself on
these steps only, by Adam with the step ``probe_lr`` (c makes B's entries
fractions of the layer's output, whatever the data's units) and one second
moment per map: the step follows the gradient's direction. Adam's per-entry
normalisation moved an entry whose gradient is only noise as far as one the
data drives, so the maps filled with noise up to their limit within a few
probes and the field's direction took longer to win (in the README example
the relaxed model's test error at 160 steps fell from 4.2× to 1.8× the
`fixed` branch's with one moment per map; BENCHMARKS.md). They track the
non-equivariant correction the data asks for at this layer, independently of γ,
of where γ started, of the branch's scale and of the host's optimizer, learning
rate and schedule (in the host's optimizer they learned at the host's pace: a
field read 0 after 480 steps at Adam lr 1e-3 on 6 of 12 initialisations, 2 of 12
now). A level saturates at a correction of τ, so each map is scaled back
whenever its output exceeds ``probe_limit`` × τ of the layer's: larger maps
measure nothing more, they would only perturb the host model on probing steps,
and under a slowly learning host two unbounded maps drift apart to the size of
the output itself, burying the gap in ν².

While every level ends an epoch saturated at 1 (fully relaxed), probing more
often would only confirm it, and each probing step costs the branch a step: the
interval then doubles per epoch up to ``probe_every_saturated`` (default 4 ×
``probe_every``), and each probe weighs in the gap's EMA as the steps since the
last one, so its horizon stays a share of the budget. Any level below 1 at an
epoch's end sets the interval back. (The README example's relaxed model at 480
steps: 1.40× to 1.09× the `fixed` branch's test error.)

A long run needs no more probes than a shorter one: ``probe_every`` (null by
default) is 4, or in runs of more than 10000 steps ⌈T / 2500⌉, so a run probes
at most about 2500 times (a 50000-step training every 20th step). Every probing
step costs the host a perturbed step and the branch a step, and ~1.6 plain
steps' worth of operator calls, which bound a GPU step (BENCHMARKS.md); 2500
probes still let a map travel 250× its limit and give the gap's EMA a horizon of
500 probes.

Probing a share of the samples on every step instead (the branch then trains on
every step) was measured: far closer to the `fixed` branch in short plain loops,
worse in `make demo`'s symmetric MACE fine-tune, so it is not used (BENCHMARKS.md).

Split. A sample's half is a hash of its own raw input (``equirelax.core.samples``),
so it is the same in every epoch whatever batch the host draws it in: a
structure's positions for MACE, NequIP and SevenNet (every atom of a structure on
its side), a row of a plain model's input tensor, or the ids a loop gives with
``handle.set_samples``. Rows that are the batch's edges take their sender's side
(a host batch's ``edge_index``, a plain model's first [2, n] integer argument);
rows that match nothing fall back to the two halves of the batch's rows. Maps that
both met every sample (a split by position, under a host that reshuffles) agreed
on the finite set's own orientations.

Gap. On each probing step the layer measures the size of that correction
relative to its own output over all the batch's rows,
    b² = ⟨P⊥(V_a)x, P⊥(V_b)x⟩ / ‖f_eq(x)‖²:
the two maps learn from disjoint samples, so the noise each picks up (an optimizer
random-walks on a pure-noise gradient) is independent and drops out of the
inner product in expectation, where ‖P⊥(V)x‖² would keep it. The inner product
of two independent noises still scatters, by about ν²/√p with ν² = ‖P⊥(V_a −
V_b)x‖²/2 ÷ ‖f_eq(x)‖² the noise power and p the number of entries of V, and it
drifts slowly (V does), so averaging over time does not remove it: the gap
keeps only what exceeds two such standard errors,
    s² = max(0, EMA(b²) − 2·EMA(ν²)/√p),
a correction the two probe maps agree on beyond their noise. ``allowance``
(default "maps") counts p as the maps' entries, which assumes the noise spreads
evenly over all of them; "rows" counts the independent entries a gradient's
noise Σ δ xᵀ spreads over, from EMAs of the rows' second moments on probing
steps (``independent_entries``). A trained model's features sit in a few
directions (SevenNet-0's layers: p of 1.4 to 41 against 1920 entries), where
two noise maps agree by chance far more than the entries say; "rows" then reads
no level off symmetric data. It holds for independent gradient noise, but the
maps RECM trains (rank 2, from a random A, one Adam moment per map) agree by
chance less: the p their scatter implies on symmetric data is 1.6-2.9× the
counted one on the README model's layers, 4-10× on MACE's, 5-270× on
SevenNet-0's, so "rows" reads fields later: too late to help in the MACE and
NequIP fine-tuning benchmarks (75 and 150 steps; BENCHMARKS.md). A ratio of row
sums, s depends on neither the batch size nor the loss scale, and it grows with
the strength of a symmetry-breaking term (a field 30× weaker asks for a ~30×
smaller correction).

Level. The EMAs are the recurrent state, with a rate a tied to the run's budget
T (a horizon of ``horizon`` × the ``probe_every`` probing steps in T); after each probe
    γ = min(1, s/τ),
τ the correction (relative to the layer's output) at which the layer is fully
relaxed. γ starts at ``gamma0`` and, from the first probe on, is set by the data
whatever it started at: bounded by the gap, → 0 where the data asks for no
correction beyond the probes' noise.

Warm-up (option ``warmup``, off by default). The probe maps start at zero and
need a few hundred steps to agree on a correction, so the gap reads 0 early
whatever the data, and γ follows it from the first probe on: in a short run the
branch may then have few steps left to learn once the gap shows. With ``warmup``
= f > 0, γ = (1 − w)·γ0 + w·min(1, s/τ), w rising linearly from 0 to 1 over the
first f of the budget; from then on the data alone sets the level. Measured
(f = 0.5, BENCHMARKS.md, while the probe maps were in the host's optimizer):
better in short MACE, NequIP and N-body fine-tunes, worse in the plain e3nn
loops (160 and 1500 steps), so it is not the default.

What it cannot tell apart:
- an equivariant target sampled in a few fixed frames (a small set whose
  orientations are not spread out) from a real broken symmetry: to the model the
  data *is* not symmetric; orientation-dependent noise looks like a weak field;
- a finite symmetric training set from a real broken symmetry, now and then: maps
  that learn from disjoint halves of the set share none of its orientations, but two
  independent noise maps still agree by chance, and the default allowance 2·ν²/√p, p the
  maps' entries, assumes the noise spreads evenly over all of them. On the README
  model's downstream layer (4 outputs) the scatter is 1.4× wider than assumed, and 2 of
  16 runs on 512 symmetric samples (float64, seeds 0-15) read a level there (with
  per-entry moments too); where the inputs enter it is half as wide and none does. Each
  map following its gradient puts its noise on fewer entries: a 40-step SevenNet-0
  fine-tune on symmetric data read levels of 1.0, 1.0 and 0.47 on three seeds (0.24 on
  one layer of one seed with per-entry moments), and on field data the same layer read
  1.0. ``allowance: rows`` reads none of these (0 of 16; every SevenNet-0 level 0 on
  both data), at the cost above. Counting the entries as the participation ratio of the
  maps' gradient second moments gave 0.66, 0 and 0 on SevenNet-0 and also read fields
  later in every host fine-tune (BENCHMARKS.md, ``benchmarks/recm_noise.py``). On the
  README example at Adam lr 1e-3, batches reshuffled, 0 of 12 runs read a level > 0.1
  (9 of 12 when both maps met every sample);
- which of several layers should carry a correction that each of them could
  make: a layer downstream of the one where the breaking enters reads a level
  too (each layer's maps are bounded, so none absorbs the whole correction);
- a breaking of rank above ``probe_rank`` is measured by its largest part only.
"""

from __future__ import annotations

import functools
import math

import torch

from ..distributed import all_reduce_
from ..hookspecs import hookimpl
from ..irreps import to_device_async
from .base import Controller


ALLOWANCES = ("maps", "rows")  # p of the noise allowance: the probe maps' entries, or independent_entries of the rows
SKETCH_COLUMNS = 64  # a second moment of a wider dimension is kept as its product with this many random vectors


@functools.lru_cache(maxsize=64)
def _sketch_vectors(dim: int, device: str) -> torch.Tensor | None:
    """None where a dim × dim moment is kept whole; else fixed Gaussian vectors [dim, SKETCH_COLUMNS]."""
    if dim <= SKETCH_COLUMNS:
        return None
    generator = torch.Generator().manual_seed(dim)
    return to_device_async(torch.randn(dim, SKETCH_COLUMNS, generator=generator, dtype=torch.float64), device)


def moment_sketch(rows: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ over ``rows`` [n, dim] (float64), or its product with ``_sketch_vectors`` for a wide dim: linear in
    the rows, so EMAs and sums over ranks of sketches are sketches of the EMA and the sum (a 3136-wide input's
    moment would take 79 MB per layer in every checkpoint; its sketch takes 1.6 MB)."""
    vectors = _sketch_vectors(rows.shape[-1], str(rows.device))
    return rows.T @ rows if vectors is None else rows.T @ (rows @ vectors)


def moment_traces(sketch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr(M), tr(M²), tr(M⁴) of a second moment M from ``moment_sketch``'s sketch S: exact for a whole moment; for
    S = M·Z, Z Gaussian with k columns, the unbiased tr(ZᵀS)/k, tr(SᵀS)/k and Σ_{i≠j} (SᵀS)_ij² / (k(k−1))
    (with W = SᵀS = ZᵀM²Z, E[W_ij²] = tr(M⁴) for i ≠ j)."""
    vectors = _sketch_vectors(sketch.shape[0], str(sketch.device))
    if vectors is None:
        return torch.diagonal(sketch).sum(), sketch.pow(2).sum(), (sketch @ sketch).pow(2).sum()
    k = vectors.shape[1]
    gram = sketch.T @ sketch
    off_diagonal = gram.pow(2).sum() - torch.diagonal(gram).pow(2).sum()
    return (vectors * sketch).sum() / k, torch.diagonal(gram).sum() / k, off_diagonal / (k * (k - 1))


def independent_entries(inputs: torch.Tensor, outputs: torch.Tensor, otherwise: float) -> torch.Tensor:
    """p, the number of independent entries over which two independent noise maps' agreement ⟨N_a x, N_b x⟩
    (summed over rows) scatters, relative to their power: its standard deviation is ν²/√p. A map's noise is its
    gradient's, Σ δ xᵀ over rows, whose covariance is D ⊗ C (D: the outputs' second moment, C: the inputs'),
    and the inputs weigh twice, once in the noise and once in the inner product, so
    p = tr(C²)²/tr(C⁴) · tr(D)²/tr(D²) (each a participation ratio; d_in·d_out for isotropic rows).
    ``inputs``, ``outputs``: ``moment_sketch`` of C and D (or their EMAs); ``otherwise`` where either is still
    zero or p is not finite."""
    tiny = torch.finfo(torch.float64).tiny
    _, input_square, input_fourth = moment_traces(inputs)
    output_trace, output_square, _ = moment_traces(outputs)
    entries = (input_square**2 / input_fourth.clamp(min=tiny)) * (output_trace**2 / output_square.clamp(min=tiny))
    measured = (input_square > 0) & (output_square > 0) & torch.isfinite(entries) & (entries > 0)
    return torch.where(measured, entries, torch.full_like(entries, otherwise))


PROBE_EVERY = 4  # the probing interval of runs up to MAX_PROBES × PROBE_EVERY steps
MAX_PROBES = 2500  # longer runs probe about this often in all (a default ``probe_every`` of ⌈T / MAX_PROBES⌉)


class RECM(Controller):
    name = "recm"
    defaults = {"probe_every": None, "probe_every_saturated": None, "tau": 0.05, "horizon": 0.2, "gamma0": 1.0,
                "probe_rank": 2, "warmup": 0.0, "probe_lr": 0.01, "probe_limit": 2.0, "allowance": "maps"}
    needs_probe = True

    def validate(self):
        if self.options["allowance"] not in ALLOWANCES:
            raise ValueError(f"equirelax: recm option 'allowance' must be one of {ALLOWANCES}, "
                             f"got {self.options['allowance']!r}")
        self._positive("tau", "horizon", "probe_lr", "probe_limit")
        self._positive("warmup", allow_zero=True)
        if self.options["warmup"] > 1:
            raise ValueError(f"equirelax: recm option 'warmup' must be in [0, 1], got {self.options['warmup']!r}")
        rank = self.options["probe_rank"]
        if not self._is_integer(rank) or rank < 1:
            raise ValueError(f"equirelax: recm option 'probe_rank' must be a positive integer, got {rank!r}")
        every = self.options["probe_every"]
        if every is not None and (not self._is_integer(every) or every < 2):
            raise ValueError(f"equirelax: recm option 'probe_every' must be an integer >= 2 or null (4, or "
                             f"⌈total_steps / {MAX_PROBES}⌉ in longer runs), got {every!r}")
        saturated = self.options["probe_every_saturated"]
        if saturated is not None and (not self._is_integer(saturated) or saturated < self.given_interval):
            raise ValueError(f"equirelax: recm option 'probe_every_saturated' must be an integer >= probe_every "
                             f"({self.given_interval}) or null (4 × probe_every), got {saturated!r}")
        if not 0 <= self.options["gamma0"] <= 1:
            raise ValueError(f"equirelax: recm option 'gamma0' must be in [0, 1], got {self.options['gamma0']!r}")

    def initial_gamma(self) -> float:
        return float(self.options["gamma0"])

    def setup(self, layers):
        for layer in layers.values():
            layer.add_probe_weight(self.options["probe_rank"])
            layer.add_state("gap", torch.zeros((), dtype=layer.gamma.dtype))  # EMA of b²
            layer.add_state("noise", torch.zeros((), dtype=layer.gamma.dtype))  # EMA of ν²
            layer.add_state("gap_weight", torch.zeros((), dtype=layer.gamma.dtype))  # EMA bias correction
            layer.add_state("steps", torch.zeros((), dtype=torch.long))
            for key in ("A", "B"):  # the probe maps' Adam moments; float64, as a float32 v underflows at grad ~1e-20
                weight = layer._buffers[f"probe_{key}"]
                for moment in ("m", "v"):  # (checkpoints written while the maps were host parameters lack them)
                    layer.add_state(f"probe_{moment}{key}", torch.zeros_like(weight, dtype=torch.float64),
                                    fresh_if_missing=True)
            layer.record_probe_rows = self.options["allowance"] == "rows"
            if layer.record_probe_rows:  # the rows' second moments on probing steps, sketched
                for key, dim in (("input", layer.probe_A.shape[-1]), ("output", layer.probe_B.shape[-2])):
                    layer.add_state(f"{key}_moment", torch.zeros(dim, min(dim, SKETCH_COLUMNS), dtype=torch.float64),
                                    fresh_if_missing=True)
            layer.add_state("probe_updates", torch.zeros((), dtype=torch.long), fresh_if_missing=True)
            # the probing schedule: the last probing step (-1: none yet) and the steps from it to the next
            layer.add_state("last_probe", torch.full((), -1, dtype=torch.long), fresh_if_missing=True)
            layer.add_state("probe_interval", torch.tensor(self.given_interval), fresh_if_missing=True)
        # (a host may give the budget after relaxing: the first step's hook sets the interval from it)
        self.steps, self.last_probe, self.interval = 0, -1, self.given_interval
        self._roots = {}
        self._set_probing()

    @property
    def given_interval(self) -> int:
        """``probe_every`` as given, else PROBE_EVERY: the interval before the budget is known."""
        return self.options["probe_every"] or PROBE_EVERY

    def probe_every(self, handle) -> int:
        """``probe_every``, or by default PROBE_EVERY, and ⌈T / MAX_PROBES⌉ where that is larger (T the budget)."""
        every = self.options["probe_every"]
        if every is not None:
            return every
        return max(PROBE_EVERY, math.ceil(handle.require_total_steps("recm") / MAX_PROBES))

    def _set_interval(self, interval: int):
        self.interval = interval
        for layer in self.layers.values():
            layer.state("probe_interval").fill_(interval)

    def _set_probing(self):
        probing = self.steps >= self.last_probe + self.interval
        for layer in self.layers.values():
            layer.probing = probing

    def rate(self, handle, interval=None) -> float:
        """The EMA rate per probing step: a horizon of ``horizon`` × the probing steps in the budget, at
        ``probe_every``; a probe ``interval`` steps after the last one weighs interval / probe_every of that."""
        every = self.probe_every(handle)
        probes = handle.require_total_steps("recm") / every
        return min(1.0, (interval or every) / every / (1.0 + self.options["horizon"] * probes))

    def trust(self, handle) -> float:
        """The share of γ the measured level sets: 1, or with ``warmup`` > 0 rising linearly from 0 to 1 over
        that fraction of the budget (the rest is ``gamma0``)."""
        warmup = self.options["warmup"] * handle.require_total_steps("recm")
        return 1.0 if warmup <= 0 else min(1.0, (self.steps + 1) / warmup)

    def noise_entries(self, layer) -> float | torch.Tensor:
        """p for this layer's allowance: the probe maps' entries (``allowance`` "maps"), or ``independent_entries``
        of the EMAs of the rows' second moments on probing steps ("rows"; the maps' entries before a probe)."""
        maps = float(layer.probe_A[0].numel() + layer.probe_B[0].numel())
        if self.options["allowance"] == "maps":
            return maps
        entries = independent_entries(layer.state("input_moment"), layer.state("output_moment"), maps)
        return entries.to(layer.gamma.dtype)

    def gap(self, layer) -> torch.Tensor:
        """s = √max(0, EMA(b²) − 2·EMA(ν²)/√p), the EMAs bias-corrected, p from ``noise_entries``."""
        return self._gap(layer.state("gap"), layer.state("noise"), layer.state("gap_weight"),
                         self.noise_entries(layer) ** 0.5)

    @staticmethod
    def _gap(gap, noise, weight, root_entries):
        """``gap`` for the EMA states (one layer's, or stacked over layers) and √p."""
        weight = weight.clamp(min=1e-12)
        return torch.sqrt(torch.clamp(gap / weight - 2.0 * noise / weight / root_entries, min=0))

    def _root_entries(self, names, like: torch.Tensor) -> torch.Tensor:
        """√p of the layers ``names``, stacked: under allowance "maps" constants, copied to the device once."""
        if self.options["allowance"] != "maps":
            return torch.stack([self.noise_entries(self.layers[name]) ** 0.5 for name in names]).to(like.dtype)
        key = (tuple(names), like.dtype, like.device)
        if key not in self._roots:
            roots = torch.tensor([self.noise_entries(self.layers[name]) ** 0.5 for name in names], dtype=like.dtype)
            self._roots[key] = to_device_async(roots, like.device)
        return self._roots[key]

    @hookimpl
    def equirelax_after_optimizer_step(self, handle, finite):
        if next(iter(self.layers.values())).probing:
            self.last_probe = self.steps
            for layer in self.layers.values():
                layer.state("last_probe").fill_(self.steps)
        self.steps += 1
        for layer in self.layers.values():
            layer.state("steps").fill_(self.steps)
        self._set_probing()

    @hookimpl
    def equirelax_load_state_dict(self, handle, state):
        first = next(iter(self.layers.values()))
        every = self.given_interval  # (what checkpoints from before the schedule probed at)
        self.steps, self.last_probe = int(first.state("steps")), int(first.state("last_probe"))
        self.interval = int(first.state("probe_interval"))
        if self.last_probe < 0 and self.steps >= every:  # a checkpoint from before the schedule was saved
            self.last_probe, self.interval = self.steps // every * every - 1, every
        self._set_probing()

    @hookimpl
    def equirelax_epoch_end(self, handle, epoch):
        """Probe every ``probe_every(handle)`` steps; while every level ends an epoch saturated at 1 (fully relaxed:
        probing more would only confirm it, and each probing step costs the branch a step), the interval
        doubles per epoch up to ``probe_every_saturated`` (default 4 × ``probe_every``); any level below 1 at an
        epoch's end sets it back. Read at the epoch's end, not per step, so the step path never waits on the
        device."""
        every = self.probe_every(handle)
        cap = max(self.options["probe_every_saturated"] or 4 * every, every)
        saturated = self.last_probe >= 0 and all(float(layer.gamma) == 1.0 for layer in self.layers.values())
        self._set_interval(min(2 * self.interval, cap) if saturated else every)
        self._set_probing()

    def train_probes(self, finite, sizes):
        """One Adam step (``probe_lr``, betas 0.9 / 0.999, one second moment per map and factor: the step follows
        the gradient's direction, ``probe_lr`` in rms) on the probe maps of every layer that probed, from this
        step's gradients averaged over the ranks; then each map whose output (``sizes``: ‖P⊥V x‖ / ‖f_eq(x)‖ this
        step) exceeds ``probe_limit`` × τ is scaled back to that limit."""
        probed = {}
        for name, layer in self.layers.items():
            leaves, layer.probe_leaves = getattr(layer, "probe_leaves", None), None
            if leaves is not None and all(leaf.grad is not None for leaf in leaves):
                probed[name] = [leaf.grad.to(torch.float64) for leaf in leaves]
        if not probed:
            return
        all_reduce_([g for grads in probed.values() for g in grads], average=True)
        lr, beta1, beta2 = self.options["probe_lr"], 0.9, 0.999
        with torch.no_grad():
            for name, grads in probed.items():
                layer = self.layers[name]
                ok = finite & torch.stack([torch.isfinite(g).all() for g in grads]).all()
                count = layer.state("probe_updates")
                count.add_(ok.long())
                n = count.clamp(min=1).to(torch.float64)
                for key, grad in zip(("A", "B"), grads):
                    m, v, weight = (layer.state(f"probe_m{key}"), layer.state(f"probe_v{key}"),
                                    layer._buffers[f"probe_{key}"])
                    m.copy_(self.keep_if(ok, beta1 * m + (1 - beta1) * grad, m))
                    v.copy_(self.keep_if(ok, beta2 * v + (1 - beta2) * grad * grad, v))
                    scale = v.mean(dim=tuple(range(1, v.dim())), keepdim=True)  # one second moment per map
                    step = lr * (m / (1 - beta1**n)) / ((scale / (1 - beta2**n)).sqrt() + 1e-30)
                    weight.copy_(self.keep_if(ok, weight - step.to(weight.dtype), weight))
                if name in sizes:
                    shrink = torch.clamp(self.options["probe_limit"] * self.options["tau"] / sizes[name], max=1.0)
                    shrink = self.keep_if(ok & torch.isfinite(shrink), shrink, torch.ones_like(shrink))
                    layer.probe_B.mul_(shrink.to(layer.probe_B.dtype).view(2, 1, 1))

    @hookimpl
    def equirelax_after_backward(self, handle, finite):
        if self.last_probe < 0:  # before the first probe (and the optimizer's first step: a missing budget raises)
            every = self.probe_every(handle)
            if every != self.interval:
                self._set_interval(every)  # (the next step's probing follows from it, after the optimizer's step)
        measured = {name: layer.probe_sums for name, layer in self.layers.items()
                    if layer.probing and layer.probe_sums is not None}
        sums = [torch.stack(values).to(torch.float64) for values in measured.values()]
        moments = ({name: [moment_sketch(rows.to(torch.float64)) for rows in self.layers[name].probe_rows]
                    for name in measured} if self.options["allowance"] == "rows" else {})
        all_reduce_(sums + [m for pair in moments.values() for m in pair], average=False)  # the global batch's rows
        tiny = torch.finfo(torch.float64).tiny
        sizes = {name: (values[3:5] / values[2].clamp(min=tiny)).sqrt().clamp(min=tiny)
                 for name, values in zip(measured, sums)}
        self.train_probes(finite, sizes)
        if not measured:
            return
        a = self.rate(handle, self.steps - self.last_probe)  # (the steps since the last probe)
        tau, gamma0 = self.options["tau"], self.options["gamma0"]
        trust = self.trust(handle)
        names = list(measured)
        with torch.no_grad():  # the scalars of every probed layer at once
            for name in names:
                layer = self.layers[name]
                layer.probe_sums = layer.probe_rows = None
                for key, value in zip(("input_moment", "output_moment"), moments.get(name, ())):  # "rows"
                    state = layer.state(key)
                    state.copy_(self.keep_if(finite, (1 - a) * state + a * value, state))
            values = torch.stack(sums)  # [layers, 5]
            output = values[:, 2].clamp(min=tiny)
            dtype = self.layers[names[0]].gamma.dtype
            updated = {}
            for key, value in (("gap", (values[:, 0] / output).to(dtype)), ("noise", (values[:, 1] / output).to(dtype)),
                               ("gap_weight", None)):
                state = self.stacked(key, names)
                new = (1 - a) * state + (a if value is None else a * value)
                updated[key] = self.keep_if(finite, new, state)
                self.write_back(key, updated[key], names)
            roots = self._root_entries(names, updated["gap"])
            gap = self._gap(updated["gap"], updated["noise"], updated["gap_weight"], roots)
            gamma_new = trust * torch.clamp(gap / tau, max=1.0) + (1 - trust) * gamma0
            gammas = [self.layers[name].gamma for name in names]
            torch._foreach_copy_(gammas, list(self.keep_if(finite, gamma_new, torch.stack(gammas)).unbind()))

    @hookimpl
    def equirelax_metrics(self, handle):
        return {f"recm/gap/{name}": float(self.gap(layer)) for name, layer in self.layers.items()}
