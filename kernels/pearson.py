"""Fused Triton kernels of the cross-rank Pearson loss L = 1 − r(cos(a, b), y).

Forward: :func:`_pearson_fwd_kernel` reads each row of a and b once, writes the cosine xᵢ and the
row norms, and one float64 partial of [n, Σx, Σy, Σxy, Σx², Σy²] per program; the host adds the
partials and all-reduces the six sums (the loss's only collective, shared with the torch reference
through :func:`pcc_dist.cross_rank.pearson_global_stats`). Backward:
:func:`_pearson_bwd_kernel` writes ∂a, ∂b from the saved global moments, with no communication.
Math, degenerate cases and the gradient convention are those of
:class:`pcc_dist.losses.reference_pearson.PearsonFunction`, which is the oracle of these kernels.

Precision: the kernels compute the cosines in fp32 (the reference uses float64). Their rounding,
about 1.2e-7·|x̄|, enters r and its gradient as an error of about 1.2e-7 / (σx/|x̄|): 1e-4 at a
relative spread of 1e-3 (any trained or pretrained model), but 1 % at 1.2e-5 and 8 % at 1.5e-6,
just above the zero-variance guard (1e-6). Below :data:`FP32_COSINE_MIN_REL_SPREAD` the forward
warns with a :class:`CosinePrecisionWarning` naming the spread, the expected error and the fix
(``loss.kernel=torch``). float64 in the kernel would remove the error, but many GPUs run float64
at 1/32-1/64 of the fp32 rate, which would turn this memory-bound kernel compute-bound.

Importing this module imports Triton (``ImportError`` naming the package when it is missing).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from pcc_dist.cross_rank import (
    DEFAULT_EPS,
    PearsonOutput,
    PearsonStats,
    check_pearson_inputs,
    pearson_global_stats,
    resolve_grad_scale,
)
from pcc_dist.kernels._utils import (
    check_triton_device,
    reject_float64,
    require_triton,
    row_major,
)
from pcc_dist.kernels.launch import Launch, cdiv, next_power_of_2, pointer

triton = require_triton()
import triton.language as tl  # noqa: E402  (after the guarded import that names the missing package)

__all__ = [
    "FP32_COSINE_MIN_REL_SPREAD",
    "FP32_COSINE_REL_ROUNDING",
    "CosinePrecisionWarning",
    "PearsonTritonFunction",
    "pearson_triton",
]

# Rows × columns per program: BLOCK_B·BLOCK_D = 4,096 fp32 values (16 KiB of a, 16 KiB of b) in
# flight per program, the usual size for a row-reduction kernel. Not tuned on a GPU (none here).
_TILE_ELEMENTS = 4096
_MAX_BLOCK_D = 1024
_N_SUMS = 6
# Rounding of the forward kernel's fp32 cosines relative to |x̄|: the dot, the two norms and the
# division each round to 2^-24 ≈ 6e-8. Measured against a float64 oracle for σx/|x̄| from 1e-3
# down to 1.5e-6, the gradient was off by (0.8-1.1e-7) / (σx/|x̄|) here and fp32 torch cosines by
# (1.1-1.25e-7) / (σx/|x̄|); tests/kernels checks the bound with a 2× margin.
FP32_COSINE_REL_ROUNDING = 1.2e-7
# Warn once the expected error FP32_COSINE_REL_ROUNDING / (σx/|x̄|) exceeds 1 %: below 1.2e-5.
FP32_COSINE_MIN_REL_SPREAD = FP32_COSINE_REL_ROUNDING / 0.01


class CosinePrecisionWarning(RuntimeWarning):
    """The cosines of a batch nearly coincide, so the kernel's fp32 cosines limit r's accuracy."""


def warn_if_fp32_cosines_too_close(stats: PearsonStats) -> None:
    """Warn when fp32 cosine rounding is a large share of the batch's cosine spread σx.

    A degenerate batch already got its own warning (zero variance) and has zero gradient. The
    message is rounded to one significant digit so that Python's once-per-message filter does not
    repeat it for every step of a run.
    """
    spread = stats.relative_spread_x
    if stats.degenerate or spread >= FP32_COSINE_MIN_REL_SPREAD:
        return
    error = FP32_COSINE_REL_ROUNDING / spread
    warnings.warn(
        f"Pearson loss (Triton kernel): the cosines of this global batch nearly coincide "
        f"(relative spread σx/|x̄| ≈ {spread:.0e}, below {FP32_COSINE_MIN_REL_SPREAD:.1e}); the "
        f"kernel computes cosines in fp32, so r and its gradient may be off by ~{error:.0%}. Use "
        "loss.kernel=torch (float64 cosines) for such data, or check whether the embeddings "
        "have collapsed",
        CosinePrecisionWarning,
        stacklevel=4,
    )


@triton.jit
def _pearson_fwd_kernel(
    a_ptr,
    b_ptr,
    y_ptr,
    x_ptr,
    norm_a_ptr,
    norm_b_ptr,
    partial_ptr,
    rows,
    dim,
    stride_a,
    stride_b,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sq_a = tl.zeros((BLOCK_B,), dtype=tl.float32)
    sq_b = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < dim)
        a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        b = tl.load(b_ptr + offs_b[:, None] * stride_b + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        dot += tl.sum(a * b, axis=1)
        sq_a += tl.sum(a * a, axis=1)
        sq_b += tl.sum(b * b, axis=1)
    norm_a = tl.sqrt(sq_a)
    norm_b = tl.sqrt(sq_b)
    x = dot / (tl.maximum(norm_a, eps) * tl.maximum(norm_b, eps))
    tl.store(x_ptr + offs_b, x, mask=row_ok)
    tl.store(norm_a_ptr + offs_b, norm_a, mask=row_ok)
    tl.store(norm_b_ptr + offs_b, norm_b, mask=row_ok)
    # Partial sums in float64 (why: pcc_dist.cross_rank.local_moment_sums).
    xd = tl.where(row_ok, x, 0.0).to(tl.float64)
    yd = tl.load(y_ptr + offs_b, mask=row_ok, other=0.0).to(tl.float64)
    base = partial_ptr + pid * 6
    tl.store(base + 0, tl.sum(row_ok.to(tl.float64), axis=0))
    tl.store(base + 1, tl.sum(xd, axis=0))
    tl.store(base + 2, tl.sum(yd, axis=0))
    tl.store(base + 3, tl.sum(xd * yd, axis=0))
    tl.store(base + 4, tl.sum(xd * xd, axis=0))
    tl.store(base + 5, tl.sum(yd * yd, axis=0))


@triton.jit
def _pearson_bwd_kernel(
    a_ptr,
    b_ptr,
    y_ptr,
    x_ptr,
    norm_a_ptr,
    norm_b_ptr,
    coef_ptr,
    grad_a_ptr,
    grad_b_ptr,
    rows,
    dim,
    stride_a,
    stride_b,
    stride_ga,
    stride_gb,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_b = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    # coef = [α·g, β·g, x̄, ȳ] in float64, g = grad_output·grad_scale: ∂L/∂xᵢ = α(yᵢ−ȳ) + β(xᵢ−x̄).
    alpha = tl.load(coef_ptr + 0)
    beta = tl.load(coef_ptr + 1)
    mean_x = tl.load(coef_ptr + 2)
    mean_y = tl.load(coef_ptr + 3)
    x = tl.load(x_ptr + offs_b, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + offs_b, mask=row_ok, other=0.0).to(tl.float64)
    dl_dx = (alpha * (y - mean_y) + beta * (x.to(tl.float64) - mean_x)).to(tl.float32)
    raw_a = tl.load(norm_a_ptr + offs_b, mask=row_ok, other=1.0)
    raw_b = tl.load(norm_b_ptr + offs_b, mask=row_ok, other=1.0)
    na = tl.maximum(raw_a, eps)
    nb = tl.maximum(raw_b, eps)
    # d(v / max(‖v‖, eps)) has the −x·v/n² term only where the clamp is inactive.
    cross = dl_dx / (na * nb)
    self_a = tl.where(raw_a >= eps, -dl_dx * x / (na * na), 0.0)
    self_b = tl.where(raw_b >= eps, -dl_dx * x / (nb * nb), 0.0)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < dim)
        a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        b = tl.load(b_ptr + offs_b[:, None] * stride_b + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        grad_a = b * cross[:, None] + a * self_a[:, None]
        grad_b = a * cross[:, None] + b * self_b[:, None]
        tl.store(grad_a_ptr + offs_b[:, None] * stride_ga + offs_d[None, :], grad_a, mask=mask)
        tl.store(grad_b_ptr + offs_b[:, None] * stride_gb + offs_d[None, :], grad_b, mask=mask)


def plan_pearson(rows: int, dim: int, dtype: torch.dtype, score_dtype: torch.dtype,
                 block_b: int | None = None, block_d: int | None = None) -> tuple[Launch, Launch]:
    """``(forward, backward)`` launches for ``rows`` pairs of ``dim``-dimensional embeddings.

    Raises:
        ValueError: ``block_b`` or ``block_d`` not a power of two.
    """
    for name, value in (("block_b", block_b), ("block_d", block_d)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two, got {value}")
    bd = block_d or min(max(next_power_of_2(max(dim, 1)), 16), _MAX_BLOCK_D)
    bb = block_b or max(1, _TILE_ELEMENTS // bd)
    const = {"BLOCK_B": bb, "BLOCK_D": bd}
    types = {"a_ptr": pointer(dtype), "b_ptr": pointer(dtype), "y_ptr": pointer(score_dtype),
             "eps": "fp32"}
    grid = (cdiv(rows, bb),)
    # 8 warps: 4 warps spill on sm_80 with fp16 inputs (16 B/thread, measured by the compile check).
    forward = Launch(_pearson_fwd_kernel, grid, const, {**types, "partial_ptr": "*fp64"},
                     num_warps=8)
    backward = Launch(_pearson_bwd_kernel, grid, const,
                      {**types, "coef_ptr": "*fp64", "grad_a_ptr": pointer(dtype),
                       "grad_b_ptr": pointer(dtype)}, num_warps=8)
    return forward, backward


class PearsonTritonFunction(torch.autograd.Function):
    """Triton twin of :class:`pcc_dist.losses.reference_pearson.PearsonFunction`; returns
    ``(loss, r)``."""

    @staticmethod
    def forward(ctx, a, b, scores, group, grad_scale: float, eps: float, blocks):
        a, b, scores = row_major(a), row_major(b), scores.contiguous()
        rows, dim = a.shape
        forward, backward = plan_pearson(rows, dim, a.dtype, scores.dtype, *blocks)
        x = torch.empty(rows, dtype=torch.float32, device=a.device)
        norm_a, norm_b = torch.empty_like(x), torch.empty_like(x)
        partial = torch.zeros((max(forward.programs, 1), _N_SUMS), dtype=torch.float64,
                              device=a.device)
        forward(a, b, scores, x, norm_a, norm_b, partial, rows, dim, a.stride(0), b.stride(0), eps)
        stats = pearson_global_stats(partial.sum(0), group)
        warn_if_fp32_cosines_too_close(stats)
        ctx.save_for_backward(a, b, scores, x, norm_a, norm_b)
        ctx.stats, ctx.grad_scale, ctx.eps, ctx.backward = stats, grad_scale, eps, backward
        loss = torch.tensor(1.0 - stats.r, dtype=torch.float32, device=a.device)
        r = torch.tensor(stats.r, dtype=torch.float32, device=a.device)
        ctx.mark_non_differentiable(r)
        return loss, r

    @staticmethod
    def backward(ctx, grad_loss, grad_r):
        a, b, scores, x, norm_a, norm_b = ctx.saved_tensors
        stats: PearsonStats = ctx.stats
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        rows, dim = a.shape
        if stats.degenerate or rows == 0:
            return grad_a, grad_b, None, None, None, None, None
        alpha, beta = stats.x_gradient_coefficients()
        coef = torch.tensor(
            [alpha, beta, stats.mean_x, stats.mean_y], dtype=torch.float64, device=a.device
        )
        # Fold grad_output·grad_scale into α and β on the device (no host sync on grad_loss).
        coef[:2] *= grad_loss.double() * ctx.grad_scale
        ctx.backward(a, b, scores, x, norm_a, norm_b, coef, grad_a, grad_b, rows, dim,
                     a.stride(0), b.stride(0), grad_a.stride(0), grad_b.stride(0), ctx.eps)
        return grad_a, grad_b, None, None, None, None, None


def pearson_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    scores: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
    eps: float = DEFAULT_EPS,
    block_b: int | None = None,
    block_d: int | None = None,
) -> PearsonOutput:
    """Pcc-tuning loss 1 − r over the global batch with the fused Triton kernels.

    Same contract as :func:`pcc_dist.losses.reference_pearson.pearson_reference` (formula,
    collectives, degenerate cases, gradient convention); computes in fp32 (fp32/bf16/fp16 inputs),
    and warns (:class:`CosinePrecisionWarning`) when the cosines are too close for fp32 (module
    docstring).

    Args:
        a: First embedding of each pair on this rank.
        b: Second embedding of each pair on this rank.
        scores: Gold similarity of each pair.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.
        eps: Norm clamp of the cosine.
        block_b: Rows per program (power of two); default from D.
        block_d: Columns per inner step (power of two); default next_pow2(D) capped at 1,024.

    Returns:
        :class:`~pcc_dist.cross_rank.PearsonOutput` ``(loss, r)``.

    Raises:
        ValueError: Bad shapes, float64 inputs, or block sizes that are not powers of two.
        RuntimeError: Tensors on a device Triton cannot run on.

    Shape:
        - a, b: ``[B, D]``
        - scores: ``[B]``
        - loss, r: ``[]``

    References:
        Pcc-tuning (EMNLP 2024).
    """
    check_pearson_inputs(a, b, scores)
    reject_float64("Pearson", [a, b])
    check_triton_device(a)
    scale = resolve_grad_scale(grad_scale, group)
    plan_pearson(0, a.shape[1], a.dtype, scores.dtype, block_b, block_d)  # bad blocks fail here
    loss, r = PearsonTritonFunction.apply(a, b, scores, group, scale, eps, (block_b, block_d))
    return PearsonOutput(loss, r)
