"""CR: scheduled constraint relaxation (Pertigkiozoglou et al., NeurIPS 2024).

One global level θ shared by all relaxed layers, set by a schedule over epochs,
plus a regulariser on the branch only: λ_reg·(√LD + √N), with the Lie-derivative
term LD = Σ_k ‖f(A_k x) − A_k f(x)‖² over the three so(3) generators and the
norm term N = ‖f(x)‖², both on detached layer inputs. The regulariser's gradient
is added to the branch gradients after backward, so the host loss is untouched.

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
    d_in, d_out = x.shape[-1], getattr(branch, "dim_out", x.shape[-1])
    generators = isinstance(A_in, GeneratorAction) and isinstance(A_out, GeneratorAction)
    closed_form_flops = d_in * d_in * (n + 6 * d_out)
    if isinstance(branch, LowRankBranch) and generators:
        columns = 4 * branch.rank  # of the rows' products in the rank route
        # through the rank unless the dense closed form is nearly as cheap: the rank route's few extra
        # small ops cost what ~4× fewer FLOPs save on the smallest maps (e3nn_synthetic.py speed)
        if closed_form_flops > 4 * n * columns * (d_in + columns):
            return _lowrank_lie_derivative_terms(branch, x, A_in, A_out)
    closed_form_cheaper = closed_form_flops < 9 * n * d_out * d_in  # rough FLOP counts of the two routes
    if isinstance(branch, LINEAR_KINDS) and generators and closed_form_cheaper:
        # closed form: mean_n ‖M x_n‖² = tr(M C Mᵀ) with C = XᵀX/n and M_k = W A_k − A_k W
        C = x.T @ x / n
        W = branch.weight
        M = A_in.right(W) - A_out.left(W)
        return (M @ C * M).sum(), (W @ C * W).sum()
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


def _lowrank_lie_derivative_terms(branch, x: torch.Tensor, A_in: GeneratorAction, A_out: GeneratorAction):
    """``(LD, N)`` of W = B·A through its rank r, never forming W or acting on the rows' features.

    Row n's Lie derivative is M_k x_n with M_k = W A_k − A_k W = B (A A_k) − (A_k B) A, so with the rows'
    r × r second moments S_k = mean_n (A A_k x_n)(A A_k x_n)ᵀ, C_k = mean_n (A A_k x_n)(A x_n)ᵀ and
    P = mean_n (A x_n)(A x_n)ᵀ (one [n, 4r] product with the rows),
    mean_n ‖M_k x_n‖² = ⟨S_k, BᵀB⟩ − 2⟨C_k, Bᵀ(A_k B)⟩ + ⟨P, (A_k B)ᵀ(A_k B)⟩, summed over k in a few
    batched ops. The dense closed form costs d_out·d_in² per generator, the row-wise one the generators
    acting on every row.
    """
    A, B = branch.A, branch.B
    r, n = A.shape[0], max(x.shape[0], 1)
    z = x @ torch.cat([A_in.right(A).reshape(3 * r, -1), A]).T  # rows of [A A_1; A A_2; A A_3; A] x: [n, 4r]
    moments = z.T @ z / n
    S = moments[:3 * r, :3 * r].reshape(3, r, 3, r).diagonal(dim1=0, dim2=2).sum(-1)  # Σ_k S_k
    C, P = moments[:3 * r, 3 * r:].reshape(3, r, r), moments[3 * r:, 3 * r:]
    AB = A_out.left(B)  # A_k B: [3, d_out, r]
    gram, stacked = B.T @ B, AB.reshape(-1, r)
    lie = (S * gram).sum() - 2 * (C * (B.T @ AB)).sum() + (P * (stacked.T @ stacked)).sum()
    return lie, (P * gram).sum()


class CR(Controller):
    name = "cr"
    defaults = {"schedule": "triangular", "epochs": None, "theta": 1.0, "reg_weight": 0.01, "eps": 1e-12,
                "regulariser": "reference"}
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
        if self.options["regulariser"] not in REGULARISERS:
            raise ValueError(f"equirelax: cr option 'regulariser' must be one of {REGULARISERS}, "
                             f"got {self.options['regulariser']!r}")

    def theta(self, epoch: int) -> float:
        o = self.options
        return cr_schedule(o["schedule"], epoch, o["epochs"], o["theta"])

    def initial_gamma(self) -> float:
        return self.theta(0)

    def setup(self, layers):
        self.generators = {
            name: (GeneratorAction(layer.branch_irreps_in), GeneratorAction(layer.irreps_out))
            for name, layer in layers.items()
        }
        self.last_regulariser = None

    def _inputs(self) -> dict:
        return {name: torch.cat([c.reshape(-1, c.shape[-1]) for c in layer.cached_inputs])
                for name, layer in self.layers.items() if layer.cached_inputs}

    def regulariser(self, inputs: dict | None = None) -> torch.Tensor | None:
        """The regulariser on the inputs cached during this step's forward (see the module docstring)."""
        eps = self.options["eps"]
        terms = []
        for name, x in (self._inputs() if inputs is None else inputs).items():
            A_in, A_out = self.generators[name]
            lie, norm = lie_derivative_terms(self.layers[name].branch, x, A_in, A_out)
            terms.append((lie, norm, x.shape[0]))
        if not terms:
            return None
        if self.options["regulariser"] == "reference":
            lie_sum = sum(lie * rows for lie, _, rows in terms)
            norm_sum = sum(norm * rows for _, norm, rows in terms)
            return self.options["reg_weight"] * (torch.sqrt(lie_sum + eps) + torch.sqrt(norm_sum + eps))
        return self.options["reg_weight"] * sum(torch.sqrt(lie + eps) + torch.sqrt(norm + eps) for lie, norm, _ in terms)

    def _regulariser_gradients(self):
        """``(value, {param: grad})`` of the regulariser on this step's inputs.

        Data parallel: LD and N are means over the rows of the *global* batch, under a square
        root, so each rank differentiates its own row sums, and the sums and their gradients are
        added over the ranks (one collective) before the chain rule: every rank gets the gradient
        a single process would compute on the whole batch.
        """
        eps, weight = self.options["eps"], self.options["reg_weight"]
        inputs = self._inputs()
        if not inputs:
            return None, {}
        if world_size() == 1:
            with torch.enable_grad():
                reg = self.regulariser(inputs)
                params = [p for name in inputs for p in self.layers[name].branch.parameters() if p.requires_grad]
                grads = torch.autograd.grad(reg, params, allow_unused=True)
            return reg.detach(), {p: g for p, g in zip(params, grads) if g is not None}
        sums, grads, params = [], [], []
        with torch.enable_grad():
            for name, x in inputs.items():
                branch = self.layers[name].branch
                layer_params = [p for p in branch.parameters() if p.requires_grad]
                A_in, A_out = self.generators[name]
                lie, norm = lie_derivative_terms(branch, x, A_in, A_out)
                rows = x.shape[0]
                for term in (lie * rows, norm * rows):
                    # LD is a constant 0 on layers whose irreps the generators do not act on (all scalars)
                    term_grads = (torch.autograd.grad(term, layer_params, retain_graph=True, allow_unused=True)
                                  if term.requires_grad else [None] * len(layer_params))
                    grads += [torch.zeros_like(p) if g is None else g for p, g in zip(layer_params, term_grads)]
                    sums.append(term.detach().reshape(1))
                sums.append(torch.full((1,), float(rows), dtype=lie.dtype, device=lie.device))
                params.append(layer_params)
        all_reduce_([*sums, *grads], average=False)
        reference = self.options["regulariser"] == "reference"
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
            g = torch.where(finite, g, torch.zeros_like(g))
            p.grad = g if p.grad is None else p.grad + g
        self.last_regulariser = value

    @hookimpl
    def equirelax_epoch_end(self, handle, epoch):
        value = self.theta(epoch)
        for layer in self.layers.values():
            layer.gamma.data.fill_(value)

    @hookimpl
    def equirelax_metrics(self, handle):
        metrics = {"cr/theta": self.theta(handle.epoch)}
        if self.last_regulariser is not None:
            metrics["cr/regulariser"] = float(self.last_regulariser)
        return metrics
