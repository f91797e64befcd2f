"""orthogonalize(): every route/method against independent SVD references (docs/optimizer_math.md §2)."""
import pytest
import torch

from tuneonce.optimizer.orthogonalize import (
    choose_route,
    normalization_safety,
    orthogonalize,
    singular_value_map,
)

SHAPES = [(3, 8, 256), (3, 256, 8), (2, 48, 64)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _reference(X: torch.Tensor, method: str, steps: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U·diag(f(σ̂))·Vᵀ from a float64 SVD, and max f(σ̂)."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    norm = X.double().norm(dim=(-2, -1))[..., None]
    f = singular_value_map(S / (norm * normalization_safety(method) + eps), method, steps)
    return (U * f.unsqueeze(-2)) @ Vh, f.amax(-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("route", ["gram", "iterative"])
def test_exact_matches_svd_polar_factor(shape, route):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    O, sigma = orthogonalize(X, method="exact", route=route)
    assert O.shape == X.shape and O.dtype == X.dtype
    assert _rel(O, U @ Vh) <= 1e-4
    torch.testing.assert_close(sigma, torch.ones(shape[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("route", ["gram", "iterative"])
@pytest.mark.parametrize("method,steps", [("newton_schulz", 5), ("polar_express", 5), ("polar_express", 9)])
def test_polynomial_routes_apply_the_singular_value_map(shape, route, method, steps):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref, ref_sigma = _reference(X, method, steps, 1e-7)
    O, sigma = orthogonalize(X, method=method, steps=steps, route=route)
    assert _rel(O, ref) <= 1e-4
    torch.testing.assert_close(sigma.double(), ref_sigma, rtol=1e-4, atol=0)
    # sigma_max is the real spectral norm of the result
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(O, ord=2), rtol=1e-4, atol=0)


def test_newton_schulz_is_not_the_polar_factor():
    """Keller Jordan's 5 quintic steps leave σ roughly in 0.68–1.2: the map is not 1 (docs/optimizer_math.md §2)."""
    f = singular_value_map(torch.linspace(1e-3, 1, 2000, dtype=torch.float64), "newton_schulz", 5)
    assert f.max() > 1.1 and f[f.numel() // 20 :].min() < 0.8
    assert torch.equal(singular_value_map(torch.tensor([0.0, 0.3]), "exact"), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("route", ["gram", "iterative"])
def test_damping_linear_regime_follows_the_input_spectrum(route):
    """‖X‖_F ≪ eps: f acts linearly (f'(0) = a⁵), so O = a⁵·X/(‖X‖_F + eps), not orthogonal."""
    X = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-6
    eps = 10.0
    O, sigma = orthogonalize(X, method="newton_schulz", eps=eps, route=route)
    slope = 3.4445**5 / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    assert _rel(O, slope * X) <= 1e-5
    s = torch.linalg.svdvals(O)
    assert (s[..., 0] / s[..., -1] > 1.5).all()  # keeps the gradient's own spread of singular values


@pytest.mark.parametrize("route", ["gram", "iterative"])
def test_damping_orthogonal_regime(route):
    """‖X‖_F ≫ eps: the damping is negligible and the exact method gives U·Vᵀ."""
    X = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)) * 1e3
    O, _ = orthogonalize(X, method="exact", eps=1e-3, route=route)
    s = torch.linalg.svdvals(O)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-4, rtol=0)
    ns, _ = orthogonalize(X, method="newton_schulz", eps=1e-3, route=route)
    ns_free, _ = orthogonalize(X, method="newton_schulz", eps=0.0, route=route)
    assert _rel(ns, ns_free) <= 1e-5


@pytest.mark.parametrize("route", ["gram", "iterative"])
def test_per_matrix_damping_tensor(route):
    X = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(4))
    eps = torch.tensor([1e-7, 1.0, 30.0])
    O, sigma = orthogonalize(X, eps=eps, route=route)
    for i in range(3):
        Oi, si = orthogonalize(X[i], eps=float(eps[i]), route=route)
        torch.testing.assert_close(O[i], Oi, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sigma[i], si, atol=1e-5, rtol=1e-4)


def test_zero_matrix_maps_to_zero_on_every_route():
    for route in ("gram", "iterative"):
        for method in ("newton_schulz", "polar_express", "exact"):
            O, sigma = orthogonalize(torch.zeros(2, 4, 32), method=method, route=route)
            assert torch.equal(O, torch.zeros_like(O)) and torch.equal(sigma, torch.zeros(2))


def test_auto_route_uses_gram_for_low_rank_shapes():
    assert choose_route((16, 1280)) == "gram" and choose_route((5120, 16)) == "gram"
    assert choose_route((640, 640)) == "iterative" and choose_route((48, 64)) == "iterative"


@pytest.mark.parametrize(
    "kwargs,match",
    [({"method": "svd"}, "method"), ({"route": "fast"}, "route"), ({"steps": 0}, "ns_steps")],
)
def test_bad_arguments_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthogonalize(torch.randn(4, 4), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="matrices"):
        orthogonalize(torch.randn(5))
    with pytest.raises(ValueError, match="empty"):
        orthogonalize(torch.randn(0, 5))
