"""The ``@triton.jit`` programs of the InfoNCE kernels: row norms, the tiled forward (fused and
split-D), the recomputed gradient of the logits, the scaled GEMM and the normalisation's chain rule.

Device code only, private to :mod:`pcc_dist.kernels.infonce` (hence no ``__all__``): what each
program computes, per its grid, is in its comments; how the host plans and launches them (tiles,
grids, modes) is :mod:`pcc_dist.kernels.infonce`, whose docstring gives the algorithm. Importing
this module imports Triton (``ImportError`` naming the package when it is missing).
"""

from __future__ import annotations

from pcc_dist.kernels._utils import require_triton

triton = require_triton()
import triton.language as tl  # noqa: E402  (after the guarded import that names the missing package)


@triton.jit
def _row_sq_kernel(x_ptr, out_ptr, rows, dim, d_chunk, stride,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[s, r] = Σ over D slice s of x[r, d]²; grid (row tiles, D slices).
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = offs_r < rows
    d_lo = tl.program_id(1) * d_chunk
    d_hi = tl.minimum(d_lo + d_chunk, dim)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < d_hi)
        x = tl.load(x_ptr + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + tl.program_id(1) * rows + offs_r, acc, mask=row_ok)


@triton.jit
def _dot_tile(a_ptr, c_ptr, offs_b, offs_m, row_ok, col_ok, d_lo, d_hi, stride_a, stride_c,
              BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """[BLOCK_B × BLOCK_M] raw dot products aᵢ·cⱼ over d in [d_lo, d_hi), fp32 accumulator."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < d_hi
        a = tl.load(a_ptr + offs_b[:, None] * stride_a + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        c = tl.load(c_ptr + offs_m[:, None] * stride_c + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        # Operands in their own dtype: 16-bit tiles run on tensor cores with fp32 accumulation.
        acc = tl.dot(a, tl.trans(c), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _infonce_fwd_kernel(a_ptr, c_ptr, inv_a_ptr, inv_c_ptr, label_ptr, max_ptr, sum_ptr, pos_ptr,
                        rows, cands, dim, label_offset, tiles_per_slice, stride_a, stride_c,
                        inv_temp, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (anchor tile, candidate slice): online max/sum over the slice's tiles, written as
    # partials [slices, rows]. Slices are never empty (plan_block), so run_max ends finite.
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    inv_a = tl.load(inv_a_ptr + offs_b, mask=row_ok, other=0.0)
    label = tl.load(label_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_B,), dtype=tl.float32)
    m_lo = tl.program_id(1) * tiles_per_slice * BLOCK_M
    m_hi = tl.minimum(m_lo + tiles_per_slice * BLOCK_M, cands)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = offs_m < m_hi
        dots = _dot_tile(a_ptr, c_ptr, offs_b, offs_m, row_ok, col_ok, 0, dim, stride_a,
                         stride_c, BLOCK_B, BLOCK_M, BLOCK_D, PRECISION)
        inv_c = tl.load(inv_c_ptr + offs_m, mask=col_ok, other=0.0)
        logits = dots * inv_a[:, None] * inv_c[None, :] * inv_temp
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        pos += tl.sum(tl.where(offs_m[None, :] == label[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    out = tl.program_id(1) * rows + offs_b
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    tl.store(pos_ptr + out, pos, mask=row_ok)


@triton.jit
def _dot_partial_kernel(a_ptr, c_ptr, out_ptr, rows, cands, dim, d_chunk, stride_a, stride_c,
                        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    # Program (anchor tile, candidate tile, D slice s): out[s, i, j] = Σ over slice s of aᵢ·cⱼ.
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = offs_b < rows
    col_ok = offs_m < cands
    d_lo = tl.program_id(2) * d_chunk
    d_hi = tl.minimum(d_lo + d_chunk, dim)
    dots = _dot_tile(a_ptr, c_ptr, offs_b, offs_m, row_ok, col_ok, d_lo, d_hi, stride_a, stride_c,
                     BLOCK_B, BLOCK_M, BLOCK_D, PRECISION)
    out = out_ptr + tl.program_id(2).to(tl.int64) * rows * cands
    tl.store(out + offs_b[:, None] * cands + offs_m[None, :], dots,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_logits_kernel(a_ptr, c_ptr, inv_a_ptr, inv_c_ptr, label_ptr, lse_ptr, row_scale_ptr,
                        g_ptr, ta_ptr, tc_ptr, rows, cands, dim, label_offset, stride_a, stride_c,
                        inv_temp, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Program (candidate tile, anchor tile) of a panel: G tile into g[rows, cands], and the
    # partial sums of G·cos over the tile's candidates (ta[m tile, i]) and anchors (tc[b tile, j]).
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    col_ok = offs_m < cands
    dots = _dot_tile(a_ptr, c_ptr, offs_b, offs_m, row_ok, col_ok, 0, dim, stride_a, stride_c,
                     BLOCK_B, BLOCK_M, BLOCK_D, PRECISION)
    inv_a = tl.load(inv_a_ptr + offs_b, mask=row_ok, other=0.0)
    inv_c = tl.load(inv_c_ptr + offs_m, mask=col_ok, other=0.0)
    label = tl.load(label_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    lse = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0)
    row_scale = tl.load(row_scale_ptr + offs_b, mask=row_ok, other=0.0)
    cos = dots * inv_a[:, None] * inv_c[None, :]
    valid = row_ok[:, None] & col_ok[None, :]
    # Padded lanes get exp(−inf) = 0; masking after the exp could overflow first (lse ≈ −1/τ).
    prob = tl.exp(tl.where(valid, cos * inv_temp - lse[:, None], float("-inf")))
    onehot = tl.where(offs_m[None, :] == label[:, None], 1.0, 0.0)
    grad = (prob - onehot) * row_scale[:, None]
    tl.store(g_ptr + offs_b[:, None] * cands + offs_m[None, :], grad, mask=valid)
    weighted = grad * cos
    tl.store(ta_ptr + tl.program_id(0) * rows + offs_b, tl.sum(weighted, axis=1), mask=row_ok)
    tl.store(tc_ptr + tl.program_id(1) * cands + offs_m, tl.sum(weighted, axis=0), mask=col_ok)


@triton.jit
def _scaled_matmul_kernel(g_ptr, s_ptr, x_ptr, out_ptr, rows, inner, dim, stride_gr, stride_gk,
                          stride_x, stride_out, ACCUMULATE: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # out[r, d] (+)= Σ_k g[r, k]·s[k]·x[k, d]; program (row tile, D tile) keeps its tile in
    # registers over k and writes it once.
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    r_ok = offs_r < rows
    d_ok = offs_d < dim
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < inner
        g = tl.load(g_ptr + offs_r[:, None] * stride_gr + offs_k[None, :] * stride_gk,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(s_ptr + offs_k, mask=k_ok, other=0.0)
        x = tl.load(x_ptr + offs_k[:, None] * stride_x + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g * s[None, :], x, acc, input_precision=PRECISION)
    ptrs = out_ptr + offs_r[:, None] * stride_out + offs_d[None, :]
    mask = r_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        # Each element is read here once, before this program stores it: no load after a store.
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _normalise_grad_kernel(acc_ptr, x_ptr, inv_ptr, coef_ptr, out_ptr, rows, dim, stride_acc,
                           stride_x, stride_out, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # out = acc·inv + x·coef per row (coef = −[‖x‖ ≥ eps]·t/n², n = max(‖x‖, eps)): the chain
    # rule through x/max(‖x‖, eps). Elementwise; each element loaded and stored by one thread.
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    row_ok = offs_r < rows
    mask = row_ok[:, None] & (offs_d[None, :] < dim)
    inv = tl.load(inv_ptr + offs_r, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + offs_r, mask=row_ok, other=0.0)
    acc = tl.load(acc_ptr + offs_r[:, None] * stride_acc + offs_d[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_r[:, None] * stride_out + offs_d[None, :],
             acc * inv[:, None] + x.to(tl.float32) * coef[:, None], mask=mask)
