"""Irreps bookkeeping shared by projection, regularisers and metrics.

Everything here is derived from e3nn's own ``Irreps`` and Wigner matrices
(``D_from_angles`` / ``D_from_matrix``), which exist in e3nn 0.4.4 and 0.6.
"""

from __future__ import annotations

import functools

import torch

from ._e3nn import o3

GROUPS = ("O3", "SO3")


def to_device_async(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """``t`` on ``device`` without waiting on its queue: a copy from pageable host memory stalls the GPU
    stream, one from pinned memory does not (PyTorch keeps the pinned block until the copy has run)."""
    t = t.to(dtype) if dtype is not None else t
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def as_irreps(irreps) -> "o3.Irreps":
    try:
        return o3.Irreps(irreps)
    except Exception as error:  # e3nn raises ValueError/AssertionError on bad strings
        raise ValueError(f"equirelax: {irreps!r} is not a valid e3nn irreps specification ({error})") from error


def check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"equirelax: unknown symmetry group {group!r}; choose one of {GROUPS}")
    return group


def irrep_copy_starts(irreps, group: str = "O3") -> dict:
    """The copies of each irrep type: ``{key: ([first column of each copy], 2l+1)}``, plain ints, with key
    ``(l, p)`` for O(3) and ``l`` for SO(3) (where parity does not distinguish representations)."""
    check_group(group)
    groups: dict = {}
    offset = 0
    for mul, ir in as_irreps(irreps):
        key = (ir.l, ir.p) if group == "O3" else ir.l
        for _ in range(mul):
            groups.setdefault(key, ([], ir.dim))[0].append(offset)
            offset += ir.dim
    return groups


def copy_indices(starts: list, d: int) -> torch.Tensor:
    """``LongTensor[copies, d]``: the columns of each copy of a d-dimensional irrep from their first columns."""
    return torch.stack([torch.arange(start, start + d) for start in starts])


def random_rotations(n: int, group: str = "O3", *, dtype=torch.float64, generator=None) -> torch.Tensor:
    """``n`` Haar-random 3x3 matrices; for O(3) half of them (in expectation) include inversion."""
    check_group(group)
    if generator is None:
        R = o3.rand_matrix(n, dtype=dtype)
    else:
        # rand_matrix takes no generator: draw a uniform quaternion with ours instead
        q = torch.randn(n, 4, generator=generator, dtype=dtype)
        R = o3.quaternion_to_matrix(q / q.norm(dim=-1, keepdim=True))
    if group == "O3":
        if generator is None:
            signs = torch.randint(0, 2, (n,), dtype=dtype) * 2 - 1
        else:
            signs = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
        R = R * signs[:, None, None]
    return R


def wigner_D(irreps, R: torch.Tensor) -> torch.Tensor:
    """Representation matrices of ``irreps`` for rotation(s) ``R`` (handles det R = -1)."""
    return as_irreps(irreps).D_from_matrix(R)


# e3nn's l=1 basis is (y, z, x); Cartesian vectors must be permuted to enter as "1o".
CARTESIAN_TO_E3NN = (1, 2, 0)


def _log_near_identity(D: torch.Tensor, terms: int = 40) -> torch.Tensor:
    """Matrix logarithm by its Taylor series, valid for ||D - I|| << 1."""
    eye = torch.eye(D.shape[-1], dtype=D.dtype)
    X = D - eye
    term = eye
    result = torch.zeros_like(D)
    for k in range(1, terms + 1):
        term = term @ X
        result = result + ((-1) ** (k + 1)) * term / k
    return result


@functools.lru_cache(maxsize=64)
def _generators_cached(irreps_str: str) -> torch.Tensor:
    irreps = o3.Irreps(irreps_str)
    t = 1e-2
    zero = torch.zeros((), dtype=torch.float64)
    step = torch.full((), t, dtype=torch.float64)
    # e3nn's Euler convention is Y-X-Y: (t, 0, 0) rotates about y, (0, t, 0) about x
    A_y = _log_near_identity(irreps.D_from_angles(step, zero, zero)) / t
    A_x = _log_near_identity(irreps.D_from_angles(zero, step, zero)) / t
    A_third = A_x @ A_y - A_y @ A_x  # the Lie bracket closes the basis of so(3)
    return torch.stack([A_x, A_y, A_third])


def so3_generators(irreps) -> torch.Tensor:
    """so(3) generators represented on ``irreps``: tensor ``[3, dim, dim]`` (float64).

    Derived from e3nn's Wigner matrices, so they are consistent with
    ``Irreps.D_from_matrix`` in every e3nn version.
    """
    return _generators_cached(str(as_irreps(irreps))).clone()


class GeneratorAction:
    """Applies the three so(3) generators of ``irreps`` to matrices and row vectors.

    Equivalent to ``einsum("kij,nj->kni", so3_generators(irreps), x)``, but every copy of one
    irrep type l is gathered and acted on in one product: a few ops per distinct l, never a
    dense ``[3, dim, dim]`` product (a small GPU step is bound by its kernel launches).
    """

    def __init__(self, irreps):
        self.irreps = as_irreps(irreps)
        self.dim = self.irreps.dim
        columns: dict = {}  # l -> the columns of its copies, each copy's 2l+1 in a row
        offset = 0
        for mul, ir in self.irreps:
            if ir.l > 0:
                columns.setdefault(ir.l, []).extend(range(offset, offset + mul * ir.dim))
            offset += mul * ir.dim
        # built here, not in the training step (building reads values on the host)
        self._groups = []
        for l, index in sorted(columns.items()):
            G, d = so3_generators(f"1x{l}e"), 2 * l + 1
            # [d, 3d] [G_1 | G_2 | G_3] and [G_1ᵀ | G_2ᵀ | G_3ᵀ] act; [3d, d] [G_1; G_2; G_3] and its ᵀ contract
            self._groups.append((torch.tensor(index), d, {
                (False, "act"): G.permute(1, 0, 2).reshape(d, 3 * d),
                (True, "act"): G.transpose(1, 2).permute(1, 0, 2).reshape(d, 3 * d),
                (False, "contract"): G.reshape(3 * d, d), (True, "contract"): G.transpose(1, 2).reshape(3 * d, d)}))
        self._cache = {}

    @property
    def acts(self) -> bool:
        """Whether any generator is non-zero here (an irrep with l > 0; on scalars every A_k is 0)."""
        return bool(self._groups)

    def _on(self, dtype, device):
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = [(to_device_async(index, device), d,
                                 {k: to_device_async(G, device, dtype) for k, G in stacked.items()})
                                for index, d, stacked in self._groups]
        return self._cache[key]

    def _act(self, M: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``[3, m, dim]``: ``M @ A_k`` (``M @ A_kᵀ`` if ``transposed``) for ``M`` [m, dim]."""
        m = M.shape[0]
        out = M.new_zeros(3, m, self.dim)
        for index, d, stacked in self._on(M.dtype, M.device):
            copies = index.shape[0] // d
            block = M.index_select(1, index).reshape(m * copies, d) @ stacked[transposed, "act"]  # [m·copies, 3d]
            out.index_copy_(2, index, block.reshape(m, copies, 3, d).permute(2, 0, 1, 3).reshape(3, m, copies * d))
        return out

    def contract(self, M: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """``Σ_k M_k @ A_k`` (``A_kᵀ`` if ``transposed``) for ``M`` [3, m, dim]: ``[m, dim]``, the adjoint of
        ``right`` (of the rows' action if ``transposed``), for gradients taken by hand."""
        m = M.shape[1]
        out = M.new_zeros(m, self.dim)
        for index, d, stacked in self._on(M.dtype, M.device):
            copies = index.shape[0] // d
            block = M.index_select(2, index).reshape(3, m, copies, d).permute(1, 2, 0, 3).reshape(m * copies, 3 * d)
            out.index_copy_(1, index, (block @ stacked[transposed, "contract"]).reshape(m, copies * d))
        return out

    def left(self, M: torch.Tensor) -> torch.Tensor:
        """``A_k @ M`` for a matrix ``M`` whose rows are indexed by these irreps: ``[3, dim, m]``."""
        return self._act(M.T, transposed=True).transpose(1, 2)

    def right(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ A_k`` for a matrix ``M`` whose columns are indexed by these irreps: ``[3, m, dim]``."""
        return self._act(M, transposed=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``A_k x_n`` for every row ``x_n`` of ``x``: ``[3, n, dim]``."""
        return self._act(x, transposed=True)
