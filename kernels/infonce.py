"""Fused Triton kernels of InfoNCE: tiled cosine logits with an online log-sum-exp, never N×M.

Per candidate block (positives, then hard negatives; each ``[M_k, D]``):

- :func:`_row_norm_kernel` computes row norms once; the cosine is fused into the tiles as
  ``(aᵢ·cⱼ)·(1/max(‖aᵢ‖, eps))·(1/max(‖cⱼ‖, eps))``, so no normalised copy is written.
- :func:`_infonce_fwd_kernel`: one program per BLOCK_B anchors walks the candidates in BLOCK_M
  tiles, keeps a running max and sum (flash-attention style) and writes the per-anchor
  log-sum-exp and positive logit: O(B + M) outputs, no [B × M] buffer.
- Backward recomputes each tile. :func:`_infonce_bwd_anchor_kernel` (programs over anchors) and
  :func:`_infonce_bwd_candidate_kernel` (programs over candidates) each own their output rows, so
  no atomics are needed; :func:`_normalise_grad_kernel` applies the chain rule through the norm.

The cross-rank wiring (gather, labels offset by rank, global mean, gradient convention) is shared
with the torch reference through :func:`pcc_dist.losses.reference.global_infonce`;
:class:`pcc_dist.losses.reference.InfoNCEFunction` is the oracle of these kernels.

Importing this module imports Triton (``ImportError`` naming the package when it is missing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pcc_dist.kernels._utils import check_triton_device, require_triton, row_major
from pcc_dist.losses.reference import DEFAULT_EPS, global_infonce

triton = require_triton()
import triton.language as tl  # noqa: E402  (after the guarded import that names the missing package)

__all__ = ["InfoNCETritonFunction", "infonce_triton"]

# Tile sizes: tl.dot needs every edge ≥ 16. 32 anchors × 64 candidates × 64 dims keeps three fp32
# operand tiles at 8–16 KiB each. Not tuned on a GPU (none on the development machine).
_DEFAULT_BLOCKS = (32, 64, 64)
_NORM_BLOCK_R = 16


@triton.jit
def _row_norm_kernel(
    x_ptr, out_ptr, rows, dim, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = offs_r < rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < dim)
        x = tl.load(x_ptr + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + offs_r, tl.sqrt(acc), mask=row_ok)


@triton.jit
def _dot_tile(
    a_ptr,
    c_ptr,
    offs_b,
    offs_m,
    row_ok,
    col_ok,
    dim,
    stride_a,
    stride_c,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """[BLOCK_B × BLOCK_M] raw dot products aᵢ·cⱼ, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        a = tl.load(
            a_ptr + offs_b[:, None] * stride_a + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        c = tl.load(
            c_ptr + offs_m[:, None] * stride_c + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # "ieee": fp32 products; the TF32 default would cost ~3 decimal digits of the cosine.
        acc = tl.dot(a, tl.trans(c), acc, input_precision="ieee")
    return acc


@triton.jit
def _infonce_fwd_kernel(
    a_ptr,
    c_ptr,
    norm_a_ptr,
    norm_c_ptr,
    label_ptr,
    lse_ptr,
    pos_ptr,
    rows,
    cands,
    dim,
    label_offset,
    stride_a,
    stride_c,
    inv_temp,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    inv_a = 1.0 / tl.maximum(tl.load(norm_a_ptr + offs_b, mask=row_ok, other=1.0), eps)
    label = tl.load(label_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_B,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for m0 in range(0, cands, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = offs_m < cands
        dots = _dot_tile(
            a_ptr,
            c_ptr,
            offs_b,
            offs_m,
            row_ok,
            col_ok,
            dim,
            stride_a,
            stride_c,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        inv_c = 1.0 / tl.maximum(tl.load(norm_c_ptr + offs_m, mask=col_ok, other=1.0), eps)
        logits = dots * inv_a[:, None] * inv_c[None, :] * inv_temp
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        pos += tl.sum(tl.where(offs_m[None, :] == label[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1
        )
        run_max = new_max
    tl.store(lse_ptr + offs_b, run_max + tl.log(run_sum), mask=row_ok)
    tl.store(pos_ptr + offs_b, pos, mask=row_ok)


@triton.jit
def _grad_logit_tile(dots, inv_a, inv_c, lse, row_scale, label, offs_m, row_ok, col_ok, inv_temp):
    """(G, cos) for a tile: Gᵢⱼ = ∂L/∂cosᵢⱼ = (Pᵢⱼ − δ(j, labelᵢ))·gᵢ/τ, zero outside the batch."""
    cos = dots * inv_a[:, None] * inv_c[None, :]
    # Padded lanes get exp(−inf) = 0; masking after the exp could overflow first (lse ≈ −1/τ).
    valid = row_ok[:, None] & col_ok[None, :]
    prob = tl.exp(tl.where(valid, cos * inv_temp - lse[:, None], float("-inf")))
    onehot = tl.where(offs_m[None, :] == label[:, None], 1.0, 0.0)
    return (prob - onehot) * row_scale[:, None], cos


@triton.jit
def _infonce_bwd_anchor_kernel(
    a_ptr,
    c_ptr,
    norm_a_ptr,
    norm_c_ptr,
    label_ptr,
    lse_ptr,
    row_scale_ptr,
    acc_ptr,
    t_ptr,
    rows,
    cands,
    dim,
    label_offset,
    stride_a,
    stride_c,
    stride_acc,
    inv_temp,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # acc[i] += Σⱼ Gᵢⱼ cⱼ/‖cⱼ‖ and t[i] += Σⱼ Gᵢⱼ cosᵢⱼ; this program owns anchor rows offs_b.
    offs_b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    row_ok = offs_b < rows
    inv_a = 1.0 / tl.maximum(tl.load(norm_a_ptr + offs_b, mask=row_ok, other=1.0), eps)
    label = tl.load(label_ptr + offs_b, mask=row_ok, other=-1) - label_offset
    lse = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0)
    row_scale = tl.load(row_scale_ptr + offs_b, mask=row_ok, other=0.0)
    t = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for m0 in range(0, cands, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        col_ok = offs_m < cands
        dots = _dot_tile(
            a_ptr,
            c_ptr,
            offs_b,
            offs_m,
            row_ok,
            col_ok,
            dim,
            stride_a,
            stride_c,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        inv_c = 1.0 / tl.maximum(tl.load(norm_c_ptr + offs_m, mask=col_ok, other=1.0), eps)
        grad, cos = _grad_logit_tile(
            dots, inv_a, inv_c, lse, row_scale, label, offs_m, row_ok, col_ok, inv_temp
        )
        t += tl.sum(grad * cos, axis=1)
        grad = grad * inv_c[None, :]
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < dim
            c = tl.load(
                c_ptr + offs_m[:, None] * stride_c + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            ptrs = acc_ptr + offs_b[:, None] * stride_acc + offs_d[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(grad, c, acc, input_precision="ieee"), mask=mask)
    tl.store(t_ptr + offs_b, tl.load(t_ptr + offs_b, mask=row_ok, other=0.0) + t, mask=row_ok)


@triton.jit
def _infonce_bwd_candidate_kernel(
    a_ptr,
    c_ptr,
    norm_a_ptr,
    norm_c_ptr,
    label_ptr,
    lse_ptr,
    row_scale_ptr,
    acc_ptr,
    t_ptr,
    rows,
    cands,
    dim,
    label_offset,
    stride_a,
    stride_c,
    stride_acc,
    inv_temp,
    eps,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # acc[j] = Σᵢ Gᵢⱼ aᵢ/‖aᵢ‖ and t[j] = Σᵢ Gᵢⱼ cosᵢⱼ; this program owns candidate rows offs_m.
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col_ok = offs_m < cands
    inv_c = 1.0 / tl.maximum(tl.load(norm_c_ptr + offs_m, mask=col_ok, other=1.0), eps)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for b0 in range(0, rows, BLOCK_B):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        row_ok = offs_b < rows
        inv_a = 1.0 / tl.maximum(tl.load(norm_a_ptr + offs_b, mask=row_ok, other=1.0), eps)
        label = tl.load(label_ptr + offs_b, mask=row_ok, other=-1) - label_offset
        lse = tl.load(lse_ptr + offs_b, mask=row_ok, other=0.0)
        row_scale = tl.load(row_scale_ptr + offs_b, mask=row_ok, other=0.0)
        dots = _dot_tile(
            a_ptr,
            c_ptr,
            offs_b,
            offs_m,
            row_ok,
            col_ok,
            dim,
            stride_a,
            stride_c,
            BLOCK_B,
            BLOCK_M,
            BLOCK_D,
        )
        grad, cos = _grad_logit_tile(
            dots, inv_a, inv_c, lse, row_scale, label, offs_m, row_ok, col_ok, inv_temp
        )
        t += tl.sum(grad * cos, axis=0)
        grad_t = tl.trans(grad * inv_a[:, None])
        for d0 in range(0, dim, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < dim
            a = tl.load(
                a_ptr + offs_b[:, None] * stride_a + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            ptrs = acc_ptr + offs_m[:, None] * stride_acc + offs_d[None, :]
            mask = col_ok[:, None] & d_ok[None, :]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(grad_t, a, acc, input_precision="ieee"), mask=mask)
    tl.store(t_ptr + offs_m, t, mask=col_ok)


@triton.jit
def _normalise_grad_kernel(
    acc_ptr,
    x_ptr,
    norm_ptr,
    t_ptr,
    out_ptr,
    rows,
    dim,
    stride_acc,
    stride_x,
    stride_out,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out = acc/n − [‖x‖ ≥ eps]·t·x/n², n = max(‖x‖, eps): the chain rule through x/max(‖x‖, eps).
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = offs_r < rows
    raw = tl.load(norm_ptr + offs_r, mask=row_ok, other=1.0)
    inv = 1.0 / tl.maximum(raw, eps)
    t = tl.load(t_ptr + offs_r, mask=row_ok, other=0.0)
    coef = tl.where(raw >= eps, -t * inv * inv, 0.0)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < dim)
        acc = tl.load(
            acc_ptr + offs_r[:, None] * stride_acc + offs_d[None, :], mask=mask, other=0.0
        )
        x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_d[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        tl.store(
            out_ptr + offs_r[:, None] * stride_out + offs_d[None, :],
            acc * inv[:, None] + x * coef[:, None],
            mask=mask,
        )



def _row_norms(x: torch.Tensor, block_d: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _row_norm_kernel[(triton.cdiv(x.shape[0], _NORM_BLOCK_R),)](
            x, out, x.shape[0], x.shape[1], x.stride(0), BLOCK_R=_NORM_BLOCK_R, BLOCK_D=block_d
        )
    return out


def _normalised_grad(acc, x, norm, t, eps: float, block_d: int) -> torch.Tensor:
    """Finish a gradient: in place when x is fp32 (acc is the output), else into a new tensor."""
    out = acc if x.dtype == torch.float32 else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _normalise_grad_kernel[(triton.cdiv(x.shape[0], _NORM_BLOCK_R),)](
            acc,
            x,
            norm,
            t,
            out,
            x.shape[0],
            x.shape[1],
            acc.stride(0),
            x.stride(0),
            out.stride(0),
            eps,
            BLOCK_R=_NORM_BLOCK_R,
            BLOCK_D=block_d,
        )
    return out


class InfoNCETritonFunction(torch.autograd.Function):
    """Triton twin of :class:`pcc_dist.losses.reference.InfoNCEFunction` (same inputs and output).

    Inputs: ``(anchors [B, D], labels [B], temperature, eps, blocks (BLOCK_B, BLOCK_M, BLOCK_D),
    *candidate_blocks)``; output: per-anchor losses ``[B]`` in fp32.
    """

    @staticmethod
    def forward(ctx, anchors, labels, temperature: float, eps: float, tiles, *blocks):
        block_b, block_m, block_d = tiles
        anchors = row_major(anchors)
        blocks = tuple(row_major(c) for c in blocks)
        labels = labels.contiguous()
        rows, dim = anchors.shape
        inv_temp = 1.0 / temperature
        norm_a = _row_norms(anchors, block_d)
        norms = [_row_norms(c, block_d) for c in blocks]
        lse_parts, pos = [], torch.zeros(rows, dtype=torch.float32, device=anchors.device)
        offset = 0
        for c, norm_c in zip(blocks, norms, strict=True):
            lse_k = torch.full((rows,), float("-inf"), dtype=torch.float32, device=anchors.device)
            pos_k = torch.zeros_like(lse_k)
            if rows and c.shape[0]:
                _infonce_fwd_kernel[(triton.cdiv(rows, block_b),)](
                    anchors,
                    c,
                    norm_a,
                    norm_c,
                    labels,
                    lse_k,
                    pos_k,
                    rows,
                    c.shape[0],
                    dim,
                    offset,
                    anchors.stride(0),
                    c.stride(0),
                    inv_temp,
                    eps,
                    BLOCK_B=block_b,
                    BLOCK_M=block_m,
                    BLOCK_D=block_d,
                )
            lse_parts.append(lse_k)
            pos += pos_k
            offset += c.shape[0]
        # Combining the blocks' log-sum-exps is O(B) on the host side of the kernels.
        lse = torch.logsumexp(torch.stack(lse_parts), dim=0)
        ctx.save_for_backward(anchors, labels, lse, norm_a, *norms, *blocks)
        ctx.n_blocks, ctx.inv_temp, ctx.eps, ctx.tiles = len(blocks), inv_temp, eps, tiles
        return lse - pos

    @staticmethod
    def backward(ctx, grad_losses):
        anchors, labels, lse, norm_a, *rest = ctx.saved_tensors
        norms, blocks = rest[: ctx.n_blocks], rest[ctx.n_blocks :]
        block_b, block_m, block_d = ctx.tiles
        rows, dim = anchors.shape
        row_scale = (grad_losses.float() * ctx.inv_temp).contiguous()
        acc_a = torch.zeros((rows, dim), dtype=torch.float32, device=anchors.device)
        t_a = torch.zeros(rows, dtype=torch.float32, device=anchors.device)
        grads_c, offset = [], 0
        for c, norm_c in zip(blocks, norms, strict=True):
            args = (anchors, c, norm_a, norm_c, labels, lse, row_scale)
            scalars = (rows, c.shape[0], dim, offset)
            acc_c = torch.zeros((c.shape[0], dim), dtype=torch.float32, device=c.device)
            t_c = torch.zeros(c.shape[0], dtype=torch.float32, device=c.device)
            if rows and c.shape[0]:
                _infonce_bwd_anchor_kernel[(triton.cdiv(rows, block_b),)](
                    *args,
                    acc_a,
                    t_a,
                    *scalars,
                    anchors.stride(0),
                    c.stride(0),
                    acc_a.stride(0),
                    ctx.inv_temp,
                    ctx.eps,
                    BLOCK_B=block_b,
                    BLOCK_M=block_m,
                    BLOCK_D=block_d,
                )
                _infonce_bwd_candidate_kernel[(triton.cdiv(c.shape[0], block_m),)](
                    *args,
                    acc_c,
                    t_c,
                    *scalars,
                    anchors.stride(0),
                    c.stride(0),
                    acc_c.stride(0),
                    ctx.inv_temp,
                    ctx.eps,
                    BLOCK_B=block_b,
                    BLOCK_M=block_m,
                    BLOCK_D=block_d,
                )
            grads_c.append(_normalised_grad(acc_c, c, norm_c, t_c, ctx.eps, block_d))
            offset += c.shape[0]
        grad_a = _normalised_grad(acc_a, anchors, norm_a, t_a, ctx.eps, block_d)
        return (grad_a, None, None, None, None, *grads_c)


def _tiles(block_b: int | None, block_m: int | None, block_d: int | None) -> tuple[int, int, int]:
    tiles = tuple(v or d for v, d in zip((block_b, block_m, block_d), _DEFAULT_BLOCKS, strict=True))
    for name, value in zip(("block_b", "block_m", "block_d"), tiles, strict=True):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16 (tl.dot tile edge), got {value}")
    return tiles


def infonce_triton(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
    eps: float = DEFAULT_EPS,
    block_b: int | None = None,
    block_m: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Supervised-SimCSE InfoNCE over the global batch with the fused Triton kernels.

    Same contract as :func:`pcc_dist.losses.reference.infonce_reference` (formula, global mean,
    gradient convention); computes in fp32 (fp32/bf16/fp16 inputs).

    Args:
        anchors: hᵢ, this rank's anchors.
        positives: hᵢ⁺, this rank's positives.
        hard_negatives: hᵢ⁻, or None for in-batch negatives only.
        temperature: τ.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.
        eps: Norm clamp of the cosine.
        block_b: Anchors per tile (power of two ≥ 16).
        block_m: Candidates per tile (power of two ≥ 16).
        block_d: Embedding dims per inner step (power of two ≥ 16).

    Returns:
        Scalar loss, identical on every rank.

    Raises:
        ValueError: Bad inputs, float64 inputs or bad tile sizes.
        RuntimeError: Tensors on a device Triton cannot run on.

    Shape:
        - anchors, positives, hard_negatives: ``[B, D]``
        - output: ``[]``

    References:
        SimCSE (EMNLP 2021); GradCache (arXiv:2101.06983).
    """
    tiles = _tiles(block_b, block_m, block_d)
    inputs = [anchors, positives] + ([hard_negatives] if hard_negatives is not None else [])
    if any(t.dtype == torch.float64 for t in inputs):
        raise ValueError(
            "the Triton InfoNCE kernels compute in fp32; use kernel='torch' for float64 inputs"
        )
    check_triton_device(anchors)

    def core(a: torch.Tensor, labels: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        return InfoNCETritonFunction.apply(a, labels, temperature, eps, tiles, *blocks)

    return global_infonce(
        anchors,
        positives,
        hard_negatives,
        core,
        temperature=temperature,
        group=group,
        grad_scale=grad_scale,
    )
