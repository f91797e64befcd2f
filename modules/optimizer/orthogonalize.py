"""Orthogonalization of (batches of) matrices: the heart of the Muon family.

Every method here is a scalar map ``f`` on singular values: for ``X = U·diag(σ)·Vᵀ`` the result is
``U·diag(f(σ̂))·Vᵀ`` where ``σ̂ = σ / (‖X‖_F·safety + eps)`` are the singular values after the
Frobenius normalization (docs/optimizer_math.md §2). ``eps`` is ADDITIVE: it is the damping of §3.1 there, in
the units of ``X``. When ``‖X‖_F ≪ eps`` all σ̂ are small and the maps act linearly
(``f(σ̂) ≈ f'(0)·σ̂``: the result follows the input's own spectrum); when ``‖X‖_F ≫ eps`` the result is
(close to) orthogonal.

Two routes compute the same map:
- ``iterative``: Newton–Schulz / Polar Express matrix iterations on the full matrix (exact: SVD).
- ``gram``: one small eigendecomposition of the min(m, n)-sized Gram matrix, then
  ``O = U·diag(f(σ̂)/σ̂)·Uᵀ·X̂`` (wide) or ``X̂·V·diag(f(σ̂)/σ̂)·Vᵀ`` (tall). For low-rank factors
  (r ≪ d) this replaces d-sized products by r×r ones and gives the singular values of the
  result for free.
"""
from __future__ import annotations

import torch
from torch import Tensor

METHODS = ("newton_schulz", "polar_express", "exact")
ROUTES = ("auto", "iterative", "gram")

# Keller Jordan's quintic Newton–Schulz coefficients (modded-nanogpt / KellerJordan/Muon).
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv 2505.16932): per-step optimal quintic coefficients.
_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_PE_SAFETY = 1.01  # the paper's safety factor: keeps σ̂ inside the interval the polynomials were fit on
PE_COEFFS = tuple((a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _PE_RAW)
PE_TAIL = (1.875, -1.25, 0.375)  # repeated after the tabulated steps (their fixed point)

# Auto route: use the Gram route when the long side is at least this many times the short side.
GRAM_ASPECT = 4
# Exact map on the Gram route: singular values below this fraction of the largest count as zero.
_EXACT_RANK_TOL = 1e-6


def _coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    if method == "newton_schulz":
        return [NS_COEFFS] * steps
    if method == "polar_express":
        return [PE_COEFFS[i] if i < len(PE_COEFFS) else PE_TAIL for i in range(steps)]
    raise ValueError(f"method {method!r} has no polynomial coefficients")


def normalization_safety(method: str) -> float:
    """Multiplier of ‖X‖_F in the normalization (Polar Express uses 1.01, the others 1)."""
    return _PE_SAFETY if method == "polar_express" else 1.0


def _check(method: str, steps: int, route: str) -> None:
    if method not in METHODS:
        raise ValueError(f"orthogonalizer method must be one of {METHODS}, got {method!r}")
    if route not in ROUTES:
        raise ValueError(f"orthogonalizer route must be one of {ROUTES}, got {route!r}")
    if method != "exact" and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"ns_steps must be an integer >= 1, got {steps!r}")


def _ratio_of_squares(lam: Tensor, method: str, steps: int) -> Tensor:
    """f(σ)/σ as a function of λ = σ² (no division: exact at σ = 0 for the polynomial maps)."""
    if method == "exact":
        sigma = lam.clamp_min(0).sqrt()
        tol = sigma.amax(dim=-1, keepdim=True) * _EXACT_RANK_TOL
        return torch.where(sigma > tol, 1.0 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), 0.0)
    s = lam.clamp_min(0)
    ratio = torch.ones_like(s)
    for a, b, c in _coefficients(method, steps):
        q = a + b * s + c * s * s  # one quintic step: σ ↦ σ·q(σ²)
        ratio = ratio * q
        s = s * q * q
    return ratio


def singular_value_map(sigma: Tensor, method: str = "newton_schulz", steps: int = 5) -> Tensor:
    """The scalar map f applied to normalized singular values σ̂ (the independent reference for tests)."""
    _check(method, steps, "auto")
    sigma = torch.as_tensor(sigma)
    if method == "exact":
        return torch.where(sigma > 0, torch.ones_like(sigma), torch.zeros_like(sigma))
    out = sigma.clone()
    for a, b, c in _coefficients(method, steps):
        out = out * (a + b * out**2 + c * out**4)
    return out


def _as_batched_eps(eps: float | Tensor, X: Tensor) -> float | Tensor:
    """Accept a float or a tensor with one value per matrix (shape X.shape[:-2]) or broadcastable to (..., 1, 1)."""
    if not isinstance(eps, Tensor):
        return float(eps)
    eps = eps.to(device=X.device, dtype=torch.float32)
    if eps.ndim == X.ndim - 2 and eps.ndim > 0:
        eps = eps[..., None, None]
    return eps


def frobenius_scale(X: Tensor, method: str, eps: float | Tensor) -> Tensor:
    """1 / (‖X‖_F·safety + eps) per matrix, shape (..., 1, 1), float32 or wider."""
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32 if X.dtype != torch.float64 else None)
    return 1.0 / (norm * normalization_safety(method) + _as_batched_eps(eps, X))


def choose_route(shape: tuple[int, ...] | torch.Size, route: str = "auto") -> str:
    """The route 'auto' takes for a matrix shape: Gram when the long side ≥ GRAM_ASPECT × the short side."""
    if route != "auto":
        return route
    m, n = shape[-2], shape[-1]
    return "gram" if max(m, n) >= GRAM_ASPECT * min(m, n) else "iterative"


def small_gram(X: Tensor) -> Tensor:
    """X·Xᵀ for wide matrices, Xᵀ·X for tall ones: the min(m, n)-sized Gram matrix (no transposed copies)."""
    return X @ X.mT if X.shape[-2] <= X.shape[-1] else X.mT @ X


def gram_factor(
    X: Tensor, *, method: str, steps: int, eps: float | Tensor, gram: Tensor | None = None
) -> tuple[Tensor, Tensor, bool]:
    """The small symmetric factor M of the Gram route and σ_max of the result.

    Returns (M, sigma_max, wide): for wide X (m ≤ n) the result is ``M @ X``, for tall X it is
    ``X @ M``. The Frobenius normalization is folded into M, so X itself is never rescaled.
    ``gram``: ``small_gram(X)`` when the caller has it already (‖X‖_F² is its trace).
    """
    wide = X.shape[-2] <= X.shape[-1]
    if gram is None:
        gram = small_gram(X if X.dtype in (torch.float32, torch.float64) else X.float())
    gram = gram if gram.dtype in (torch.float32, torch.float64) else gram.float()
    norm = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()[..., None, None]
    scale = 1.0 / (norm * normalization_safety(method) + _as_batched_eps(eps, X))  # (..., 1, 1)
    lam, vecs = torch.linalg.eigh(gram * (scale * scale))  # Gram of the normalized matrix
    ratio = _ratio_of_squares(lam, method, steps)  # f(σ̂)/σ̂
    sigma_max = (ratio * lam.clamp_min(0).sqrt()).amax(dim=-1)
    factor = (vecs * (ratio * scale[..., 0]).unsqueeze(-2)) @ vecs.mT
    return factor, sigma_max, wide


def _gram_route(X: Tensor, method: str, steps: int, eps: float | Tensor) -> tuple[Tensor, Tensor]:
    factor, sigma_max, wide = gram_factor(X, method=method, steps=steps, eps=eps)
    factor = factor.to(X.dtype)
    return (factor @ X if wide else X @ factor), sigma_max


def _iterative_route(X: Tensor, method: str, steps: int, eps: float | Tensor, compute_sigma: bool) -> tuple[Tensor, Tensor | None]:
    wide = X.shape[-2] <= X.shape[-1]
    Y = X if wide else X.mT  # rows ≤ cols keeps the Gram products small
    if method == "exact":
        # U·Vᵀ with the same rank cut as the Gram route; zero matrices map to zero.
        U, S, Vh = torch.linalg.svd(Y.float() if Y.dtype not in (torch.float32, torch.float64) else Y, full_matrices=False)
        keep = (S > S.amax(dim=-1, keepdim=True) * _EXACT_RANK_TOL).to(S.dtype)
        O = (U * keep.unsqueeze(-2)) @ Vh
        sigma_max = keep.amax(dim=-1)
        O = O.to(X.dtype)
        return (O if wide else O.mT), sigma_max
    Y = Y * frobenius_scale(Y, method, eps).to(Y.dtype)
    for a, b, c in _coefficients(method, steps):
        A = Y @ Y.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.ndim == 3 else b * A + c * (A @ A)
        Y = torch.baddbmm(Y, B, Y, beta=a) if Y.ndim == 3 else a * Y + B @ Y
    sigma_max = None
    if compute_sigma:
        # Exact σ_max of the result from its small Gram matrix (not a cold power-iteration step).
        gram = Y @ Y.mT
        sigma_max = torch.linalg.eigvalsh(gram.float() if gram.dtype not in (torch.float32, torch.float64) else gram)
        sigma_max = sigma_max[..., -1].clamp_min(0).sqrt()
    return (Y if wide else Y.mT), sigma_max


def orthogonalize(
    X: Tensor,
    *,
    method: str = "newton_schulz",
    steps: int = 5,
    eps: float | Tensor = 1e-7,
    route: str = "auto",
    compute_sigma: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Apply the singular-value map of ``method`` to every matrix of X (shape (..., m, n)).

    Returns ``(O, sigma_max)``: O has X's shape and dtype; sigma_max (shape X.shape[:-2], float32)
    is the exact largest singular value of each O (None only on the iterative polynomial route with
    ``compute_sigma=False``). ``eps`` is the additive damping of the Frobenius normalization: a float
    or a tensor with one value per matrix.
    """
    _check(method, steps, route)
    if X.ndim < 2:
        raise ValueError(f"orthogonalize needs matrices (..., m, n), got shape {tuple(X.shape)}")
    if X.numel() == 0:
        raise ValueError(f"orthogonalize got an empty tensor of shape {tuple(X.shape)}")
    chosen = choose_route(X.shape, route)
    if chosen == "gram":
        return _gram_route(X, method, steps, eps)
    return _iterative_route(X, method, steps, eps, compute_sigma)
