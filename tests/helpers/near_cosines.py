"""Pairs whose cosines nearly coincide, for the precision tests of the Pearson loss (issue #19).

Shared by tests/unit/test_losses_reference.py and tests/kernels/test_pearson_kernel.py.
"""

from __future__ import annotations

import torch


def near_cosine_pairs(rows: int, dim: int, rel_spread: float, seed: int = 0,
                      mean: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 pairs with cosines xᵢ ≈ mean·(1 + rel_spread·zᵢ), zᵢ ~ N(0, 1), and scores with r ≈ 0.8.

    aᵢ is a random direction of random length in [1, 2]; bᵢ = xᵢ·uᵢ + sqrt(1 − xᵢ²)·vᵢ with uᵢ, vᵢ
    orthonormal. Rounding the rows to fp32 moves each cosine by ~1e-8 of |x̄|, far less than the
    spreads tested (≥ 1.5e-6), so σx/|x̄| is close to ``rel_spread``.

    Returns:
        ``(a, b, scores)``: ``[rows, dim]``, ``[rows, dim]``, ``[rows]``, all fp32.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64))
    v = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    v = torch.nn.functional.normalize(v - (v * u).sum(1, keepdim=True) * u)
    z = torch.randn(rows, generator=gen, dtype=torch.float64)
    x = (mean * (1 + rel_spread * z))[:, None]
    a = u * (1 + torch.rand(rows, 1, generator=gen, dtype=torch.float64))
    b = x * u + torch.sqrt(1 - x * x) * v
    scores = z + 0.7 * torch.randn(rows, generator=gen, dtype=torch.float64)
    return a.float(), b.float(), scores.float()


def relative_spread(a: torch.Tensor, b: torch.Tensor) -> float:
    """σx/|x̄| of the exact (float64) cosines of the rows of ``a`` and ``b``."""
    x = torch.nn.functional.cosine_similarity(a.double(), b.double())
    return (x.std(unbiased=False) / x.mean().abs()).item()


def gradient_error(fn, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor,
                   **kwargs) -> tuple[float, float]:
    """Relative error of ``fn``'s r and of its gradient against the float64 reference.

    The oracle is :func:`pcc_dist.losses.pearson_reference` on the same values in float64, where
    every step (cosines, sums, backward) is float64 (what ``gradcheck`` would differentiate).

    Returns:
        ``(|r − r₆₄|, ‖∇ − ∇₆₄‖ / ‖∇₆₄‖)`` with ∇ the gradient with respect to ``(a, b)``.
    """
    from pcc_dist.losses import pearson_reference

    def run(f, a_in, b_in, y_in, **kw):
        a_in, b_in = a_in.detach().clone().requires_grad_(), b_in.detach().clone().requires_grad_()
        out = f(a_in, b_in, y_in, **kw)
        grads = torch.autograd.grad(out.loss, [a_in, b_in])
        return out.r.item(), torch.cat([g.double().flatten() for g in grads])

    r64, g64 = run(pearson_reference, a.double(), b.double(), scores.double())
    r, g = run(fn, a, b, scores, **kwargs)
    return abs(r - r64), ((g - g64).norm() / g64.norm()).item()
