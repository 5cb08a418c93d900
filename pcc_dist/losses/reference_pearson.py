"""Pure-torch Pearson loss over the global batch: the CPU production path and the kernels' oracle.

L = 1 − r(x, y) with xᵢ = cos(aᵢ, bᵢ) over the N pairs of all ranks; the six sums, their one
all-reduce, the degenerate-batch policy and the gradient convention are the shared cross-rank
contract of :mod:`pcc_dist.cross_rank`. This module computes the cosines and the closed-form
backward (:class:`PearsonFunction`); :mod:`pcc_dist.kernels.pearson` is its Triton twin.

Precision:
    - Nearly equal cosines (1e-6 < σx/|x̄| ≲ 1e-4): the cosines that enter the six sums are
      computed in float64 here, so r and its gradient stay exact to ~1e-7 down to the zero-variance
      guard. fp32 cosines round to ~1e-7 relative, which is 7 % of σx at σx/|x̄| = 1.5e-6
      (tests/unit/test_losses_reference.py pins both). The Triton kernel keeps fp32 cosines and
      warns below σx/|x̄| = 1.2e-5 (:mod:`pcc_dist.kernels.pearson`, "Precision").
    - A zero-norm row: cosines use ``v / max(‖v‖, eps)`` like ``F.normalize``, so x_i = 0 and the
      gradient follows that clamp (finite).

References:
    Pcc-tuning: "Pcc-tuning: Breaking the Contrastive Learning Ceiling in Semantic Textual
    Similarity", EMNLP 2024.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pcc_dist.cross_rank import (
    DEFAULT_EPS,
    PearsonOutput,
    PearsonStats,
    check_pearson_inputs,
    compute_dtype,
    local_moment_sums,
    pearson_global_stats,
    resolve_grad_scale,
)

__all__ = ["PearsonFunction", "pearson_reference"]

# Row chunk of the Pearson reference: 16 MiB per temporary, i.e. C·D = 4M fp32 or 2M float64
# elements (a [65,536 × 4,096] product would otherwise be a 1 GiB temporary).
_PEARSON_CHUNK_BYTES = 16 << 20


def _row_chunk(dim: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one ``[C, dim]`` temporary of ``dtype`` stays within 16 MiB."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _PEARSON_CHUNK_BYTES // (max(dim, 1) * itemsize))


def _float64_cosines(
    a: torch.Tensor, b: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xᵢ = aᵢ·bᵢ / (max(‖aᵢ‖, eps) max(‖bᵢ‖, eps)) and both norms, computed in float64.

    Why float64: r depends on the cosines only through xᵢ − x̄. fp32 cosines carry ~1e-7 relative
    rounding (dot, norms, division), which is 1 % of σx at σx/|x̄| = 1e-5 and 7 % at 1.5e-6; the
    gradient inherited errors of 1 % and 8 % there (tests/unit/test_losses_reference.py). Any
    fp32/bf16/fp16 product is exact in float64, so these cosines are exact to ~1e-16 and the
    result is exact to the fp32 output's own rounding down to the zero-variance guard. The cost
    is float64 arithmetic on N·D elements in chunks, next to a model forward over the same rows.

    Shape:
        - a, b: ``[B, D]``
        - outputs: three ``[B]`` float64 tensors
    """
    rows = a.shape[0]
    x = torch.empty(rows, dtype=torch.float64, device=a.device)
    norm_a, norm_b = torch.empty_like(x), torch.empty_like(x)
    step = _row_chunk(a.shape[1], torch.float64)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        a_c, b_c = a[start:stop].double(), b[start:stop].double()
        norm_a[start:stop] = torch.linalg.vector_norm(a_c, dim=1)
        norm_b[start:stop] = torch.linalg.vector_norm(b_c, dim=1)
        x[start:stop] = torch.linalg.vecdot(a_c, b_c) / (
            norm_a[start:stop].clamp_min(eps) * norm_b[start:stop].clamp_min(eps)
        )
    return x, norm_a, norm_b


class PearsonFunction(torch.autograd.Function):
    """L = 1 − r(x, y) over the global batch, xᵢ = cos(aᵢ, bᵢ); closed-form backward, no collective.

    Forward: float64 cosines row-chunked (:func:`_float64_cosines`), six float64 sums, one
    all-reduce. Backward (in the inputs' compute dtype, at least fp32):
    ∂L/∂xᵢ = α(yᵢ − ȳ) + β(xᵢ − x̄) (see :meth:`PearsonStats.x_gradient_coefficients`), then through
    the cosine with norms nₐ = max(‖aᵢ‖, eps):
    ∂xᵢ/∂aᵢ = bᵢ/(nₐ n_b) − xᵢ·[‖aᵢ‖ ≥ eps]·aᵢ/nₐ² (and symmetrically for bᵢ), scaled by
    ``grad_output · grad_scale``. Scores get no gradient (they are labels).

    Returns ``(loss, r)``; r is non-differentiable.
    """

    @staticmethod
    def forward(ctx, a, b, scores, group, grad_scale: float, eps: float):
        cdt = compute_dtype(a.dtype)
        x, norm_a, norm_b = _float64_cosines(a, b, eps)
        y = scores.to(cdt)
        stats = pearson_global_stats(local_moment_sums(x, y), group)
        ctx.save_for_backward(a, b, x, y, norm_a, norm_b)
        ctx.stats, ctx.grad_scale, ctx.eps = stats, grad_scale, eps
        loss = torch.tensor(1.0 - stats.r, dtype=cdt, device=a.device)
        r = torch.tensor(stats.r, dtype=cdt, device=a.device)
        ctx.mark_non_differentiable(r)
        return loss, r

    @staticmethod
    def backward(ctx, grad_loss, grad_r):
        a, b, x, y, norm_a, norm_b = ctx.saved_tensors
        stats: PearsonStats = ctx.stats
        if stats.degenerate:
            return torch.zeros_like(a), torch.zeros_like(b), None, None, None, None
        alpha, beta = stats.x_gradient_coefficients()
        # ∂L/∂xᵢ in float64 from the float64 cosines and the saved global moments: xᵢ − x̄ is the
        # one cancelling difference. N values, no communication.
        dl_dx = alpha * (y.double() - stats.mean_y) + beta * (x - stats.mean_x)
        # The rest needs no float64: the terms b/(nₐ n_b) and x·a/nₐ² of ∂xᵢ/∂aᵢ differ by about
        # sin∠(aᵢ, bᵢ), so fp32 loses only log10(1/sin) of its ~7 digits (the near-cosine tests
        # of tests/unit/test_losses_reference.py bound the gradient error).
        cdt = y.dtype
        coef = (dl_dx * (grad_loss.double() * ctx.grad_scale)).to(cdt)
        x = x.to(cdt)
        na, nb = norm_a.clamp_min(ctx.eps).to(cdt), norm_b.clamp_min(ctx.eps).to(cdt)
        # The −x·v/n² term of d(v/max(‖v‖, eps)) exists only where the clamp is inactive.
        live_a = (norm_a >= ctx.eps).to(cdt)
        live_b = (norm_b >= ctx.eps).to(cdt)
        cross = coef / (na * nb)
        self_a = -coef * x * live_a / (na * na)
        self_b = -coef * x * live_b / (nb * nb)
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        step = _row_chunk(a.shape[1], cdt)
        for start in range(0, a.shape[0], step):
            stop = min(start + step, a.shape[0])
            a_c, b_c = a[start:stop].to(cdt), b[start:stop].to(cdt)
            c, sa, sb = cross[start:stop, None], self_a[start:stop, None], self_b[start:stop, None]
            grad_a[start:stop] = b_c * c + a_c * sa
            grad_b[start:stop] = a_c * c + b_c * sb
        return grad_a, grad_b, None, None, None, None


def pearson_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scores: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
    eps: float = DEFAULT_EPS,
) -> PearsonOutput:
    """Pcc-tuning loss 1 − r over the global batch, pure torch (CPU production path and oracle).

    Formula:
        xᵢ = cos(aᵢ, bᵢ), r = Σ(xᵢ − x̄)(yᵢ − ȳ) / sqrt(Σ(xᵢ − x̄)² Σ(yᵢ − ȳ)²) over all N pairs of
        all ranks, L = 1 − r. r is computed from n, Σx, Σy, Σxy, Σx², Σy² all-reduced in one
        collective of 6 float64 numbers; the backward is closed-form and needs no collective.

    Args:
        a: First embedding of each pair on this rank.
        b: Second embedding of each pair on this rank.
        scores: Gold similarity of each pair (any affine scale; r is invariant to it).
        group: Process group over which the batch is global; default group when None.
        grad_scale: Factor on input gradients; None = W (:mod:`pcc_dist.cross_rank`, "Gradient
            convention").
        eps: Norm clamp of the cosine, as ``F.normalize``.

    Returns:
        :class:`PearsonOutput` ``(loss, r)``; loss is the same on every rank.

    Raises:
        ValueError: Bad shapes/dtypes, or fewer than 2 pairs globally.

    Shape:
        - a, b: ``[B, D]``
        - scores: ``[B]``
        - loss, r: ``[]``

    References:
        Pcc-tuning (EMNLP 2024), section on the Pearson objective.
    """
    check_pearson_inputs(a, b, scores)
    scale = resolve_grad_scale(grad_scale, group)
    loss, r = PearsonFunction.apply(a, b, scores, group, scale, eps)
    return PearsonOutput(loss, r)
