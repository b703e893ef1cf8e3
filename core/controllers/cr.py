"""CR: scheduled constraint relaxation (Pertigkiozoglou et al., NeurIPS 2024).

One global level θ shared by all relaxed layers, set by a schedule over epochs,
plus a regulariser on the branch only: λ_reg·(√LD + √N), with the Lie-derivative
term LD = Σ_k ‖f(A_k x) − A_k f(x)‖² over the three so(3) generators and the
norm term N = ‖f(x)‖², both on the detached inputs of the step's training forwards
(not a host's evaluation between steps: MACE validates in train mode with its
parameters frozen). The regulariser's gradient
is added to the branch gradients after backward, so the host loss is untouched.

The schedule moves on every optimizer step where the run's budget is known (the
MACE, NequIP and SevenNet plugins give it; ``total_steps`` in a plain loop): θ is
the schedule at the fractional epoch, so a one-epoch fine-tune relaxes and closes
within its epoch, and the model the last steps train is already near θ = 0 when
the branch is dropped. (Set only at epoch ends, a triangular schedule over one
epoch stayed at θ = 0 throughout, i.e. vanilla training, and over two trained the
last epoch at θ = 1 and then dropped the branch.) Steps per epoch: the budget over
``epochs`` until an epoch has ended, then the steps the epochs took. Without a
budget, or with ``granularity="epoch"``, θ changes at epoch ends only, as in the
reference code.

``regulariser="reference"`` (default) is the published one: LD and N summed over
the batch's rows and over every relaxed layer, one square root per term,
λ_reg·(√(Σ_layers Σ_rows LD) + √(Σ_layers Σ_rows N)), so λ_reg = 0.01 means what it
means in the paper (its strength grows with the batch, as there).
``regulariser="mean"`` is a batch-size-independent form: per layer, the mean
over rows under each root, λ_reg·Σ_layers(√mean LD + √mean N); at the reference's
N-body setting (500 rows, 8 layers) its branch gradients are ≈ √(rows/layers) ≈ 8×
weaker, so scale λ_reg up accordingly when choosing it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..branches import LINEAR_KINDS, LowRankBranch
from ..distributed import all_reduce_, world_size
from ..hookspecs import hookimpl
from ..irreps import GeneratorAction
from .base import Controller

SCHEDULES = ("triangular", "linear", "constant")
GRANULARITIES = ("step", "epoch")
REGULARISERS = ("reference", "mean")


def cr_schedule(schedule: str, epoch: int, epochs: int | None, theta: float = 1.0) -> float:
    """θ at the start of ``epoch`` (0-based). Triangular and linear end at exactly 0 after ``epochs``."""
    if schedule == "constant":
        return float(theta)
    if epoch >= epochs:
        return 0.0
    if schedule == "linear":
        return 1.0 - epoch / epochs
    half = epochs / 2
    return 2.0 * epoch / epochs if epoch <= half else 1.0 - 2.0 * (epoch - half) / epochs


def check_schedule_fits(epochs, max_epochs, trainer: str, length_name: str):
    """A schedule longer than training never reaches θ = 0: refuse it, naming the host's length setting."""
    if epochs and max_epochs and max_epochs > 0 and epochs > max_epochs:
        raise ValueError(
            f"equirelax: the cr schedule runs over {epochs} epochs but {trainer} stops after "
            f"{length_name}={max_epochs}; the schedule would not reach θ = 0"
        )


def _action(A):
    """A callable applying generators: a GeneratorAction, or a dense ``[3, d, d]`` tensor."""
    if callable(A) and not torch.is_tensor(A):
        return A
    return lambda v: torch.einsum("kij,nj->kni", A.to(dtype=v.dtype, device=v.device), v)


def _route(branch: nn.Module, x: torch.Tensor, A_in, A_out) -> str:
    """How LD and N are computed: "rank" (``_lowrank_terms``), "closed" (tr(M C Mᵀ) with the dense W) or "rows"."""
    n = max(x.shape[0], 1)
    d_in, d_out = x.shape[-1], getattr(branch, "dim_out", x.shape[-1])
    if not (isinstance(A_in, GeneratorAction) and isinstance(A_out, GeneratorAction)):
        return "rows"
    closed_form_flops = d_in * d_in * (n + 6 * d_out)
    if isinstance(branch, LowRankBranch):
        columns = 4 * branch.rank  # of the rows' products in the rank route
        # through the rank unless the dense closed form is nearly as cheap: the rank route's few extra
        # small ops cost what ~4× fewer FLOPs save on the smallest maps (e3nn_synthetic.py speed)
        if closed_form_flops > 4 * n * columns * (d_in + columns):
            return "rank"
    closed_form_cheaper = closed_form_flops < 9 * n * d_out * d_in  # rough FLOP counts of the two routes
    return "closed" if isinstance(branch, LINEAR_KINDS) and closed_form_cheaper else "rows"


def lie_derivative_terms(branch: nn.Module, x: torch.Tensor, A_in, A_out):
    """``(LD, N)`` averaged over the rows of ``x``.

    LD = Σ_k ‖J_f(x) A_k x − A_k f(x)‖², N = ‖f(x)‖². ``A_in``/``A_out`` are the
    generators on the input/output irreps (``GeneratorAction`` or dense
    ``[3, d, d]``). The three generator actions are stacked along their own
    leading axis (never reshaped into the feature axis), so an exactly
    equivariant f gives LD = 0.
    """
    x = x.reshape(-1, x.shape[-1])
    n = max(x.shape[0], 1)
    route = _route(branch, x, A_in, A_out)
    if route == "rank":
        return _lowrank_lie_derivative_terms(branch, x, A_in, A_out)
    if route == "closed":
        return _closed_terms(branch.weight, x, A_in, A_out)[:2]
    Ax = _action(A_in)(x)
    fx = branch(x)
    if isinstance(branch, LINEAR_KINDS):
        JAx = branch(Ax)
    else:
        JAx = torch.stack(
            [torch.autograd.functional.jvp(branch, x, Ax[k], create_graph=True)[1] for k in range(Ax.shape[0])]
        )
    Afx = _action(A_out)(fx)
    lie = (JAx - Afx).pow(2).sum() / n
    norm = fx.pow(2).sum() / n
    return lie, norm


def _closed_terms(W: torch.Tensor, x: torch.Tensor, A_in: GeneratorAction, A_out: GeneratorAction):
    """``(LD, N, M, C)``: mean_n ‖M_k x_n‖² = tr(M_k C M_kᵀ), C = XᵀX/n and M_k = W A_k − A_k W."""
    C = x.T @ x / max(x.shape[0], 1)
    M = A_in.right(W) - A_out.left(W)
    return (M @ C * M).sum(), (W @ C * W).sum(), M, C


def _lowrank_lie_derivative_terms(branch, x: torch.Tensor, A_in: GeneratorAction, A_out: GeneratorAction):
    """``(LD, N)`` of W = B·A through its rank r, never forming W or acting on the rows' features."""
    return _lowrank_terms(branch.A, branch.B, x, A_in, A_out)[:2]


def _lowrank_terms(A, B, x: torch.Tensor, A_in: GeneratorAction, A_out: GeneratorAction):
    """``(LD, N, parts)`` of W = B·A through its rank r; ``parts`` are what ``_lowrank_gradients`` reuses.

    Row n's Lie derivative is M_k x_n with M_k = W A_k − A_k W = B (A A_k) − (A_k B) A, so with the rows'
    r × r second moments S_k = mean_n (A A_k x_n)(A A_k x_n)ᵀ, C_k = mean_n (A A_k x_n)(A x_n)ᵀ and
    P = mean_n (A x_n)(A x_n)ᵀ (one [n, 4r] product with the rows),
    mean_n ‖M_k x_n‖² = ⟨S_k, BᵀB⟩ − 2⟨C_k, Bᵀ(A_k B)⟩ + ⟨P, (A_k B)ᵀ(A_k B)⟩, summed over k in a few
    batched ops. The dense closed form costs d_out·d_in² per generator, the row-wise one the generators
    acting on every row.
    """
    r, n = A.shape[0], max(x.shape[0], 1)
    z = x @ torch.cat([A_in.right(A).reshape(3 * r, -1), A]).T  # rows of [A A_1; A A_2; A A_3; A] x: [n, 4r]
    moments = z.T @ z / n
    S = moments[:3 * r, :3 * r].reshape(3, r, 3, r).diagonal(dim1=0, dim2=2).sum(-1)  # Σ_k S_k
    C, P = moments[:3 * r, 3 * r:].reshape(3, r, r), moments[3 * r:, 3 * r:]
    AB = A_out.left(B)  # A_k B: [3, d_out, r]
    gram, cross, stacked = B.T @ B, B.T @ AB, AB.reshape(-1, r)
    turned = stacked.T @ stacked  # Σ_k (A_k B)ᵀ(A_k B)
    lie = (S * gram).sum() - 2 * (C * cross).sum() + (P * turned).sum()
    return lie, (P * gram).sum(), (z, S, C, P, AB, gram, cross, turned)


def _lowrank_gradients(A, B, x, A_in, A_out, parts, alpha, beta):
    """``(∂/∂A, ∂/∂B)`` of α·LD + β·N from ``_lowrank_terms``'s parts, by hand: the chain rule through the
    moments (∂/∂z = z (D + Dᵀ)/n, D the gradient on the moments), A A_k and A_k B (the generators' adjoints)."""
    z, S, C, P, AB, gram, cross, turned = parts
    r, n = A.shape[0], max(x.shape[0], 1)
    d_moments = z.new_zeros(4, r, 4, r)
    d_moments[:3, :, :3].diagonal(dim1=0, dim2=2).copy_((alpha * gram).unsqueeze(-1))  # S = Σ_k S_k
    d_moments[:3, :, 3] = -2 * alpha * cross  # C_k
    d_moments[3, :, 3] = alpha * turned + beta * gram  # P
    d_moments = d_moments.reshape(4 * r, 4 * r)
    d_rows = (x.T @ (z @ (d_moments + d_moments.T) / n)).T  # ∂/∂[A A_1; A A_2; A A_3; A]: [4r, d_in]
    d_A = d_rows[3 * r:] + A_in.contract(d_rows[:3 * r].reshape(3, r, -1), transposed=True)
    d_AB = -2 * alpha * (B @ C) + 2 * alpha * (AB @ P)  # [3, d_out, r]
    d_B = (2 * B @ (alpha * S + beta * P) - 2 * alpha * (AB @ C.transpose(1, 2)).sum(0)
           + A_out.contract(d_AB.transpose(1, 2)).T)
    return d_A, d_B


def lie_derivative_terms_and_gradients(branch: nn.Module, x: torch.Tensor, A_in, A_out):
    """``(LD, N, gradients)`` of ``lie_derivative_terms``, detached; ``gradients(α, β)`` gives
    ``{parameter: ∂(α·LD + β·N)/∂parameter}`` over the branch's trainable parameters. On the rank and
    closed-form routes the gradients are taken by hand from the forward's parts, with no autograd graph (fewer
    and larger ops: a small GPU step is bound by its kernel launches); on the row-wise route by autograd."""
    x = x.reshape(-1, x.shape[-1])
    params = [p for p in branch.parameters() if p.requires_grad]
    route = _route(branch, x, A_in, A_out)
    if route == "rows":
        with torch.enable_grad():
            lie, norm = lie_derivative_terms(branch, x, A_in, A_out)

        def gradients(alpha, beta):
            # LD is a constant 0 on layers whose irreps the generators do not act on (all scalars)
            total = sum(c * t for t, c in ((lie, alpha), (norm, beta)) if t.requires_grad and not _is_zero(c))
            grads = (torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
                     if torch.is_tensor(total) else [None] * len(params))
            return {p: torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)}

        return lie.detach(), norm.detach(), gradients
    with torch.no_grad():
        if not (A_in.acts or A_out.acts):  # scalars only: LD is exactly 0, N and its gradient from the rows
            return _norm_terms_and_gradients(branch, x)
        if route == "rank":
            A, B = branch.A.detach(), branch.B.detach()
            lie, norm, parts = _lowrank_terms(A, B, x, A_in, A_out)

            def gradients(alpha, beta):
                with torch.no_grad():
                    d_A, d_B = _lowrank_gradients(A, B, x, A_in, A_out, parts, alpha, beta)
                return {p: g for p, g in ((branch.A, d_A), (branch.B, d_B)) if p.requires_grad}
        else:
            W = branch.weight.detach()
            lie, norm, M, C = _closed_terms(W, x, A_in, A_out)

            def gradients(alpha, beta):
                with torch.no_grad():  # ∂/∂W: 2 Σ_k (M_k C A_kᵀ − A_kᵀ M_k C) α + 2 W C β
                    MC = 2 * alpha * (M @ C)
                    d_W = (A_in.contract(MC, transposed=True) - A_out.contract(MC.transpose(1, 2)).T
                           + 2 * beta * (W @ C))
                    if isinstance(branch, LowRankBranch):
                        pairs = ((branch.A, branch.B.detach().T @ d_W), (branch.B, d_W @ branch.A.detach().T))
                    else:
                        pairs = ((branch.weight, d_W),)
                return {p: g for p, g in pairs if p.requires_grad}
    return lie, norm, gradients


def _norm_terms_and_gradients(branch, x: torch.Tensor):
    """``lie_derivative_terms_and_gradients`` of a linear branch between scalars: LD = 0, N = mean_n ‖W x_n‖²."""
    n = max(x.shape[0], 1)
    lowrank = isinstance(branch, LowRankBranch)
    z = x @ branch.A.detach().T if lowrank else x
    y = z @ (branch.B if lowrank else branch.weight).detach().T

    def gradients(alpha, beta):
        with torch.no_grad():
            d_y = (2 * beta / n) * y
            pairs = (((branch.A, (d_y @ branch.B.detach()).T @ x), (branch.B, d_y.T @ z)) if lowrank
                     else ((branch.weight, d_y.T @ x),))
        return {p: g for p, g in pairs if p.requires_grad}

    norm = y.pow(2).sum() / n
    return torch.zeros_like(norm), norm, gradients


def _is_zero(c) -> bool:
    return not torch.is_tensor(c) and c == 0


class CR(Controller):
    name = "cr"
    defaults = {"schedule": "triangular", "epochs": None, "theta": 1.0, "reg_weight": 0.01, "eps": 1e-12,
                "regulariser": "reference", "granularity": "step"}
    needs_inputs = True

    def validate(self):
        schedule = self.options["schedule"]
        if schedule not in SCHEDULES:
            raise ValueError(f"equirelax: cr option 'schedule' must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant":
            epochs = self.options["epochs"]
            if not self._is_integer(epochs) or epochs <= 0:
                raise ValueError(
                    f"equirelax: cr schedule {schedule!r} needs 'epochs', the total number of training "
                    f"epochs (a positive integer), got {epochs!r}"
                )
        self._positive("reg_weight", allow_zero=True)
        self._positive("eps")
        if self.options["granularity"] not in GRANULARITIES:
            raise ValueError(f"equirelax: cr option 'granularity' must be one of {GRANULARITIES}, "
                             f"got {self.options['granularity']!r}")
        if self.options["regulariser"] not in REGULARISERS:
            raise ValueError(f"equirelax: cr option 'regulariser' must be one of {REGULARISERS}, "
                             f"got {self.options['regulariser']!r}")

    def theta(self, epoch: float) -> float:
        """θ at ``epoch`` epochs into the run (fractional within an epoch)."""
        o = self.options
        return cr_schedule(o["schedule"], epoch, o["epochs"], o["theta"])

    def progress(self, handle) -> float:
        """Epochs completed, plus the share of the current one done where the budget is known (steps per epoch:
        the budget over ``epochs`` until an epoch has ended, then the steps the epochs took)."""
        epoch, total = handle.epoch, handle.total_steps
        if total is None or self.options["granularity"] == "epoch" or self.options["schedule"] == "constant":
            return float(epoch)
        per_epoch = self.epoch_start / epoch if epoch > 0 and self.epoch_start > 0 else total / self.options["epochs"]
        return epoch + min(1.0, max(0.0, (handle.step - self.epoch_start) / per_epoch))

    def _set_theta(self, handle):
        value = self.theta(self.progress(handle))
        if value != self.current:
            self.current = value
            gammas = [layer.gamma.data for layer in self.layers.values()]
            torch._foreach_zero_(gammas)  # (two fused ops per step for every layer, not one fill per layer)
            torch._foreach_add_(gammas, value)

    def initial_gamma(self) -> float:
        return self.theta(0)

    def setup(self, layers):
        for layer in layers.values():  # the step at which the current epoch began (resume mid-epoch)
            layer.add_state("epoch_start", torch.zeros((), dtype=torch.long), fresh_if_missing=True)
        self.epoch_start, self.current = 0, self.theta(0)
        self.generators = {
            name: (GeneratorAction(layer.branch_irreps_in), GeneratorAction(layer.irreps_out))
            for name, layer in layers.items()
        }
        self.last_regulariser = None

    def _inputs(self) -> dict:
        inputs = {}
        for name, layer in self.layers.items():
            if layer.cached_inputs:
                rows = [c.reshape(-1, c.shape[-1]) for c in layer.cached_inputs]
                inputs[name] = rows[0] if len(rows) == 1 else torch.cat(rows)  # (a cat of one tensor copies it)
        return inputs

    def _regulariser_gradients(self):
        """``(value, {param: grad})`` of the regulariser on this step's inputs.

        Data parallel: LD and N are means over the rows of the *global* batch, under a square
        root, so each rank differentiates its own row sums, and the sums and their gradients are
        added over the ranks (one collective) before the chain rule: every rank gets the gradient
        a single process would compute on the whole batch.
        """
        eps, weight = self.options["eps"], self.options["reg_weight"]
        reference = self.options["regulariser"] == "reference"
        inputs = self._inputs()
        if not inputs:
            return None, {}
        terms = {name: (*lie_derivative_terms_and_gradients(self.layers[name].branch, x, *self.generators[name]),
                        x.shape[0]) for name, x in inputs.items()}
        if world_size() == 1:  # the chain rule's factors first, then each layer's gradients once
            if reference:  # one root per term over every layer's row sums
                lie_root = torch.sqrt(sum(lie * rows for lie, _, _, rows in terms.values()) + eps)
                norm_root = torch.sqrt(sum(norm * rows for _, norm, _, rows in terms.values()) + eps)
                value = weight * (lie_root + norm_root)
                factors = {name: (weight * rows / (2 * lie_root), weight * rows / (2 * norm_root))
                           for name, (_, _, _, rows) in terms.items()}
            else:
                roots = {name: (torch.sqrt(lie + eps), torch.sqrt(norm + eps))
                         for name, (lie, norm, _, _) in terms.items()}
                value = weight * sum(lie_root + norm_root for lie_root, norm_root in roots.values())
                factors = {name: (weight / (2 * lie_root), weight / (2 * norm_root))
                           for name, (lie_root, norm_root) in roots.items()}
            result = {}
            for name, (_, _, gradients, _) in terms.items():
                result.update(gradients(*factors[name]))
            return value, result
        sums, grads, params = [], [], []
        for name, (lie, norm, gradients, rows) in terms.items():
            lie_grads, norm_grads = gradients(rows, 0), gradients(0, rows)  # of the row sums
            params.append(list(lie_grads))
            grads += [*lie_grads.values(), *(norm_grads[p] for p in lie_grads)]
            sums += [(lie * rows).reshape(1), (norm * rows).reshape(1),
                     torch.full((1,), float(rows), dtype=lie.dtype, device=lie.device)]
        all_reduce_([*sums, *grads], average=False)
        if reference:  # one root per term over every layer's row sums
            lie_root = torch.sqrt(sum(sums[3 * i][0] for i in range(len(params))) + eps)
            norm_root = torch.sqrt(sum(sums[3 * i + 1][0] for i in range(len(params))) + eps)
            value = weight * (lie_root + norm_root)
        else:
            value = 0.0
        result, offset = {}, 0
        for index, layer_params in enumerate(params):
            lie_sum, norm_sum, rows = (t[0] for t in sums[3 * index:3 * index + 3])
            count = len(layer_params)
            lie_grads, norm_grads = grads[offset:offset + count], grads[offset + count:offset + 2 * count]
            offset += 2 * count
            if not reference:
                lie_root = torch.sqrt(lie_sum / rows + eps)
                norm_root = torch.sqrt(norm_sum / rows + eps)
                value = value + weight * (lie_root + norm_root)
            scale = 1.0 if reference else rows  # d√(S)/dθ = g_S / (2√S); the mean form's S is a row sum / rows
            for p, g_lie, g_norm in zip(layer_params, lie_grads, norm_grads):
                result[p] = weight * (g_lie / (2 * lie_root * scale) + g_norm / (2 * norm_root * scale))
        return value, result

    @hookimpl
    def equirelax_after_backward(self, handle, finite):
        if self.options["reg_weight"] == 0:
            return
        value, grads = self._regulariser_gradients()
        if value is None:
            return
        for p, g in grads.items():
            g = torch.where(finite, g, 0.0)
            p.grad = g if p.grad is None else p.grad + g
        self.last_regulariser = value

    @hookimpl
    def equirelax_after_optimizer_step(self, handle, finite):
        if handle.total_steps is not None:
            self._set_theta(handle)

    @hookimpl
    def equirelax_epoch_end(self, handle, epoch):
        self.epoch_start = handle.step
        for layer in self.layers.values():
            layer.state("epoch_start").fill_(handle.step)
        self.current = None  # (written at every epoch end, whatever the last step left)
        self._set_theta(handle)

    @hookimpl
    def equirelax_load_state_dict(self, handle, state):
        self.options.setdefault("granularity", "epoch")  # (a state saved before the option was trained so)
        self.epoch_start = int(next(iter(self.layers.values())).state("epoch_start"))
        if handle.epoch > 0 and self.epoch_start == 0:  # a checkpoint from before it was kept: hosts save at epoch ends
            self.epoch_start = handle.step
        self.current = float(next(iter(self.layers.values())).gamma)

    @hookimpl
    def equirelax_metrics(self, handle):
        metrics = {"cr/theta": self.theta(self.progress(handle))}
        if self.last_regulariser is not None:
            metrics["cr/regulariser"] = float(self.last_regulariser)
        return metrics
