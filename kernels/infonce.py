"""Fused Triton kernels of InfoNCE: tiled cosine logits, tensor cores, a grid that fills the GPU.

Per candidate block (positives, then hard negatives; each ``[M_k, D]``), with the cosine fused
into the tiles as ``(aᵢ·cⱼ)·(1/max(‖aᵢ‖, eps))·(1/max(‖cⱼ‖, eps))``:

- Norms: :func:`_row_sq_kernel` sums squares over (row tile, D slice) programs.
- Forward, two modes chosen by :func:`plan_block` from the shapes:

  * **fused** (B·M_k large enough to give every program its own tiles):
    :func:`_infonce_fwd_kernel` runs one program per (anchor tile, slice of candidate tiles),
    keeps a running max and sum over its slice (flash-attention style) and writes one partial
    (max, sum, positive logit) per anchor and slice; the host merges the slices with a
    log-sum-exp. Memory O(B · slices), never [B × M_k].
  * **split-D** (B·M_k too small to fill the GPU, e.g. 32 anchors × 256 candidates on one of 8
    ranks): :func:`_dot_partial_kernel` also splits D across programs and writes partial dot
    products ``[S, B, M_k]``; the host sums them and finishes the softmax in torch. Small by
    construction (fewer than 2 × SMs tiles of ≤ 64 × 64).

- Backward: Gᵢⱼ = ∂L/∂cosᵢⱼ = (Pᵢⱼ − δ(j, labelᵢ))·gᵢ/τ, then two products
  ``acc_a = G·diag(1/‖c‖)·C`` and ``acc_c = Gᵀ·diag(1/‖a‖)·A`` by :func:`_scaled_matmul_kernel`
  (a GEMM holding its output tile in registers: each output element is written once, no
  read-modify-write of global memory inside a launch, no atomics, deterministic). G comes from the
  saved dots (split-D mode) or from :func:`_grad_logits_kernel`, which recomputes the tiles for a
  panel of anchor rows whose G fits ``workspace_bytes`` (fused mode).
  :func:`_normalise_grad_kernel` applies the chain rule through the norms.

Precision: fp32 inputs use IEEE fp32 products everywhere (``input_precision="ieee"``; TF32 would
cost ~3 decimal digits of the cosine). bf16/fp16 inputs feed their tiles to ``tl.dot`` unconverted
with an fp32 accumulator (tensor cores; a product of two 16-bit values is exact in fp32), and the
gradient GEMMs multiply the fp32 G by the upcast inputs in TF32 (tensor cores; the 16-bit inputs
are exact in TF32, G is rounded to 10 mantissa bits).

The cross-rank wiring (gather, labels offset by rank, global mean, gradient convention) is shared
with the torch reference through :func:`pcc_dist.cross_rank.global_infonce`;
:class:`pcc_dist.losses.reference_infonce.InfoNCEFunction` is the oracle of these kernels.

Importing this module imports Triton (``ImportError`` naming the package when it is missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pcc_dist.cross_rank import DEFAULT_EPS, global_infonce
from pcc_dist.kernels._utils import check_triton_device, reject_float64, row_major
from pcc_dist.kernels.infonce_jit import (
    _dot_partial_kernel,
    _grad_logits_kernel,
    _infonce_fwd_kernel,
    _normalise_grad_kernel,
    _row_sq_kernel,
    _scaled_matmul_kernel,
)
from pcc_dist.kernels.launch import (
    Launch,
    cdiv,
    check_tile,
    grid_tiles,
    pointer,
    target_programs,
)

__all__ = ["InfoNCETritonFunction", "infonce_triton", "plan_block", "plan_launches"]

_MAX_TILE = 64  # anchor and candidate tile edge: a 64 × 64 fp32 accumulator is 32 registers/thread
_K_STEP = 32  # D (or GEMM inner) elements per tl.dot step
_ROW_TILE = 16  # rows per program of the row kernels (norms, normalisation)
_WORKSPACE_BYTES = 256 * 2**20  # fp32 G panel of the fused-mode backward


@dataclass(frozen=True)
class Tiles:
    """User overrides of the anchor/candidate tile and the D step (None = planned)."""

    block_b: int | None = None
    block_m: int | None = None
    block_d: int | None = None


def _warps(tile_rows: int, tile_cols: int, dtype: torch.dtype) -> int:
    """8 warps for a 64 × 64 fp32 tile: its IEEE-fp32 dot keeps both operand tiles in registers
    and spills at 4 warps (255 registers on sm_80, measured by the compile check); else 4."""
    return 8 if dtype == torch.float32 and tile_rows * tile_cols >= 64 * 64 else 4


def _precision(dtype: torch.dtype) -> tuple[str, str]:
    """``(dot tiles, gradient GEMMs)`` input precision for an operand dtype (module docstring)."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("ieee", "tf32")


@dataclass(frozen=True)
class BlockPlan:
    """How one candidate block is processed; every launch is planned from the shapes alone.

    Attributes:
        d_chunk: D elements per slice of the split-D forward (D in the fused mode).
        forward: The forward launch (:func:`_dot_partial_kernel` or :func:`_infonce_fwd_kernel`).
        tiles_per_slice: Candidate tiles per program of the fused forward.
        panel_rows: Anchor rows per backward panel of the fused mode (G is [panel_rows, M_k]).
    """

    rows: int
    cands: int
    dim: int
    dtype: torch.dtype
    target: int
    d_chunk: int
    forward: Launch
    tiles_per_slice: int
    panel_rows: int

    @property
    def fused(self) -> bool:
        """True for the fused forward; False for split-D (possibly 1 slice when D is short)."""
        return self.forward.kernel is _infonce_fwd_kernel

    def grad_logits(self, rows: int) -> Launch:
        """:func:`_grad_logits_kernel` over a panel of ``rows`` anchors (fused mode)."""
        tb, tm = self.forward.constexprs["BLOCK_B"], self.forward.constexprs["BLOCK_M"]
        return Launch(_grad_logits_kernel, (cdiv(self.cands, tm), cdiv(rows, tb)),
                      dict(self.forward.constexprs), self.forward.types, self.forward.num_warps)

    def gemm(self, rows: int, inner: int, accumulate: bool) -> Launch:
        """:func:`_scaled_matmul_kernel` writing ``[rows, D]`` from an inner dimension ``inner``."""
        tile_r, tile_d = grid_tiles(rows, self.dim, self.target)
        return Launch(_scaled_matmul_kernel, (cdiv(rows, tile_r), cdiv(self.dim, tile_d)),
                      {"ACCUMULATE": accumulate, "BLOCK_R": tile_r, "BLOCK_K": _K_STEP,
                       "BLOCK_D": tile_d, "PRECISION": _precision(self.dtype)[1]},
                      {"x_ptr": pointer(self.dtype)}, _warps(tile_r, tile_d, self.dtype))


def plan_block(rows: int, cands: int, dim: int, dtype: torch.dtype, target: int,
               tiles: Tiles = Tiles(), workspace_bytes: int = _WORKSPACE_BYTES) -> BlockPlan:
    """Plan the launches for ``rows`` anchors against one block of ``cands`` candidates.

    Tiles are the largest (≤ 64 × 64) whose grid has ``target`` programs (:func:`grid_tiles`). If
    all anchor × candidate tiles together are fewer than ``target``, D is split as well (split-D
    mode) until the grid reaches ``target``; otherwise each program of the fused forward takes a
    slice of candidate tiles, with as many slices as reach ``target``.
    """
    tile_b, tile_m = grid_tiles(rows, cands, target, _MAX_TILE, _MAX_TILE)
    tile_b, tile_m = tiles.block_b or tile_b, tiles.block_m or tile_m
    # fp32: 16-wide steps keep the IEEE dot's operand tiles small (at 32 the fp32 G kernel
    # spilled 16 B per thread on sm_80).
    block_d = tiles.block_d or (16 if dtype == torch.float32 else _K_STEP)
    const = {"BLOCK_B": tile_b, "BLOCK_M": tile_m, "BLOCK_D": block_d,
             "PRECISION": _precision(dtype)[0]}
    b_tiles, m_tiles = cdiv(rows, tile_b), cdiv(cands, tile_m)
    types = {"a_ptr": pointer(dtype), "c_ptr": pointer(dtype), "label_ptr": pointer(torch.int64),
             "inv_temp": "fp32"}
    warps = _warps(tile_b, tile_m, dtype)
    if b_tiles * m_tiles < target:
        # Slices of whole D steps, rounded down so that the slices reach the target.
        wanted = cdiv(target, b_tiles * m_tiles)
        d_chunk = max(block_d, dim // wanted // block_d * block_d)
        forward = Launch(_dot_partial_kernel, (b_tiles, m_tiles, cdiv(dim, d_chunk)), const, types,
                         warps)
        return BlockPlan(rows, cands, dim, dtype, target, d_chunk, forward, 1, rows)
    # Whole candidate tiles per slice, rounded down so that the slices reach the target.
    per_slice = max(1, m_tiles // cdiv(target, b_tiles))
    forward = Launch(_infonce_fwd_kernel, (b_tiles, cdiv(m_tiles, per_slice)), const, types,
                     warps)
    panel = max(tile_b, workspace_bytes // (4 * max(cands, 1)) // tile_b * tile_b)
    return BlockPlan(rows, cands, dim, dtype, target, dim, forward, per_slice, min(rows, panel))


def _row_launches(rows: int, dim: int, dtype: torch.dtype,
                  target: int) -> tuple[Launch, int, Launch]:
    """``(squares, d_chunk, normalise)``: :func:`_row_sq_kernel` over D slices of ``d_chunk``
    elements and :func:`_normalise_grad_kernel`, for a ``[rows, D]`` input.

    The squares' grid is (row tiles, D slices): the largest row tile (≤ 16) whose grid, with D
    cut into slices of whole 64-element steps, reaches ``target`` programs.
    """
    block_d = 64
    for block_r in (16, 8, 4, 2, 1):
        row_tiles = cdiv(rows, block_r)
        wanted = cdiv(target, row_tiles)
        d_chunk = max(block_d, dim // wanted // block_d * block_d)
        if row_tiles * cdiv(dim, d_chunk) >= target:
            break
    squares = Launch(_row_sq_kernel, (row_tiles, cdiv(dim, d_chunk)),
                     {"BLOCK_R": block_r, "BLOCK_D": block_d}, {"x_ptr": pointer(dtype)})
    tile_r, tile_d = grid_tiles(rows, dim, target, _ROW_TILE, 128)
    normalise = Launch(_normalise_grad_kernel, (cdiv(rows, tile_r), cdiv(dim, tile_d)),
                       {"BLOCK_R": tile_r, "BLOCK_D": tile_d},
                       {"x_ptr": pointer(dtype), "out_ptr": pointer(dtype)})
    return squares, d_chunk, normalise


def _norms(x: torch.Tensor, target: int) -> torch.Tensor:
    """Row norms ‖xᵢ‖ in fp32. Shape: ``[R, D] -> [R]``."""
    squares, d_chunk, _ = _row_launches(x.shape[0], x.shape[1], x.dtype, target)
    out = torch.zeros((squares.grid[1], x.shape[0]), dtype=torch.float32, device=x.device)
    squares(x, out, x.shape[0], x.shape[1], d_chunk, x.stride(0))
    return out.sum(0).sqrt()


def _inverse(norm: torch.Tensor, eps: float) -> torch.Tensor:
    return 1.0 / norm.clamp_min(eps)


def _finish(acc: torch.Tensor, x: torch.Tensor, norm: torch.Tensor, t: torch.Tensor, eps: float,
            target: int) -> torch.Tensor:
    """Chain rule through x/max(‖x‖, eps): in place when x is fp32 (acc is the output)."""
    inv = _inverse(norm, eps)
    coef = torch.where(norm >= eps, -t * inv * inv, torch.zeros_like(t))
    out = acc if x.dtype == torch.float32 else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _, _, normalise = _row_launches(x.shape[0], x.shape[1], x.dtype, target)
    normalise(acc, x, inv, coef, out, x.shape[0], x.shape[1], acc.stride(0), x.stride(0),
              out.stride(0))
    return out


def _forward_block(plan: BlockPlan, a, c, inv_a, inv_c, labels, offset: int, inv_temp: float):
    """``(lse [B], pos [B], dots [B, M_k] or None)`` of one candidate block; dots are kept only
    in split-D mode (small by construction), for the backward."""
    rows, cands, dim = plan.rows, plan.cands, plan.dim
    f = plan.forward
    if rows == 0 or cands == 0:
        return torch.full((rows,), float("-inf"), device=a.device), inv_a.new_zeros(rows), None
    if not plan.fused:
        partial = torch.empty((f.grid[2], rows, cands), dtype=torch.float32, device=a.device)
        f(a, c, partial, rows, cands, dim, plan.d_chunk, a.stride(0), c.stride(0))
        dots = partial.sum(0)
        logits = dots * inv_a[:, None] * inv_c[None, :] * inv_temp
        local = labels - offset
        hit = (local >= 0) & (local < cands)
        pos = torch.where(hit, logits.gather(1, local.clamp(0, cands - 1)[:, None])[:, 0], 0.0)
        return torch.logsumexp(logits, dim=1), pos, dots
    slices = f.grid[1]
    maxes, sums, pos = (torch.empty((slices, rows), dtype=torch.float32, device=a.device)
                        for _ in range(3))
    f(a, c, inv_a, inv_c, labels, maxes, sums, pos, rows, cands, dim, offset,
      plan.tiles_per_slice, a.stride(0), c.stride(0), inv_temp)
    # Merge the slices: log Σₛ sumₛ·exp(maxₛ) (every slice has ≥ 1 candidate: sumₛ ≥ 1).
    return torch.logsumexp(maxes + sums.log(), dim=0), pos.sum(0), None


def _grad_block(plan: BlockPlan, a, c, inv_a, inv_c, labels, offset: int, lse, row_scale,
                dots, inv_temp: float, acc_a, t_a):
    """Add this block's share to ``acc_a``/``t_a`` (anchors); return ``(acc_c, t_c)``."""
    rows, cands, dim = plan.rows, plan.cands, plan.dim
    acc_c = torch.zeros((cands, dim), dtype=torch.float32, device=c.device)
    t_c = torch.zeros(cands, dtype=torch.float32, device=c.device)
    panels = [(0, rows)] if dots is not None else [
        (lo, min(lo + plan.panel_rows, rows)) for lo in range(0, rows, plan.panel_rows)]
    for index, (lo, hi) in enumerate(panels):
        n = hi - lo
        if dots is not None:
            cos = dots * inv_a[:, None] * inv_c[None, :]
            prob = torch.exp(cos * inv_temp - lse[:, None])
            local = labels - offset
            onehot = torch.zeros_like(prob)
            hit = (local >= 0) & (local < cands)
            onehot[hit.nonzero()[:, 0], local[hit]] = 1.0
            grad = (prob - onehot) * row_scale[:, None]
            t_a += (grad * cos).sum(1)
            t_c += (grad * cos).sum(0)
        else:
            launch = plan.grad_logits(n)
            grad = torch.empty((n, cands), dtype=torch.float32, device=a.device)
            part_a = torch.empty((launch.grid[0], n), dtype=torch.float32, device=a.device)
            part_c = torch.empty((launch.grid[1], cands), dtype=torch.float32, device=a.device)
            launch(a[lo:hi], c, inv_a[lo:hi], inv_c, labels[lo:hi], lse[lo:hi], row_scale[lo:hi],
                   grad, part_a, part_c, n, cands, dim, offset, a.stride(0), c.stride(0),
                   inv_temp)
            t_a[lo:hi] += part_a.sum(0)
            t_c += part_c.sum(0)
        # acc_a[panel] += G·diag(1/‖c‖)·C ;  acc_c += Gᵀ·diag(1/‖a‖)·A[panel]
        out_a = acc_a[lo:hi]
        plan.gemm(n, cands, accumulate=True)(
            grad, inv_c, c, out_a, n, cands, dim, grad.stride(0), grad.stride(1), c.stride(0),
            out_a.stride(0))
        plan.gemm(cands, n, accumulate=index > 0)(
            grad, inv_a[lo:hi], a[lo:hi], acc_c, cands, n, dim, grad.stride(1), grad.stride(0),
            a.stride(0), acc_c.stride(0))
    return acc_c, t_c


def plan_launches(rows: int, blocks: list[int], dim: int, dtype: torch.dtype,
                  target: int) -> dict[str, Launch]:
    """Every launch one call makes for ``rows`` anchors against candidate blocks of the given
    sizes, by role (``"block0/forward"``, ``"anchors/norms"``, …), first backward panel only; what
    ``benchmarks/kernel_resources.py`` compiles and the tests' program counts check."""
    squares, _, normalise = _row_launches(rows, dim, dtype, target)
    launches = {"anchors/norms": squares, "anchors/normalise": normalise}
    for index, cands in enumerate(blocks):
        plan = plan_block(rows, cands, dim, dtype, target)
        squares, _, normalise = _row_launches(cands, dim, dtype, target)
        name = f"block{index}"
        launches.update({f"{name}/norms": squares, f"{name}/normalise": normalise,
                         f"{name}/forward": plan.forward})
        panel = plan.panel_rows
        if plan.fused:
            launches[f"{name}/grad_logits"] = plan.grad_logits(panel)
        launches[f"{name}/grad_anchors"] = plan.gemm(panel, cands, accumulate=True)
        launches[f"{name}/grad_candidates"] = plan.gemm(cands, panel, accumulate=False)
    return launches


class InfoNCETritonFunction(torch.autograd.Function):
    """Triton twin of :class:`pcc_dist.losses.reference_infonce.InfoNCEFunction` (same inputs,
    same output).

    Inputs: ``(anchors [B, D], labels [B], temperature, eps, options, *candidate_blocks)`` with
    ``options = (tiles, target programs, workspace bytes)``; output: per-anchor losses ``[B]``
    in fp32.
    """

    @staticmethod
    def forward(ctx, anchors, labels, temperature: float, eps: float, options, *blocks):
        tiles, target, workspace = options
        anchors = row_major(anchors)
        blocks = tuple(row_major(c) for c in blocks)
        labels = labels.contiguous()
        rows, dim = anchors.shape
        inv_temp = 1.0 / temperature
        norm_a = _norms(anchors, target)
        norms = [_norms(c, target) for c in blocks]
        inv_a = _inverse(norm_a, eps)
        plans, lse_parts, saved_dots = [], [], []
        pos = torch.zeros(rows, dtype=torch.float32, device=anchors.device)
        offset = 0
        for c, norm_c in zip(blocks, norms, strict=True):
            plan = plan_block(rows, c.shape[0], dim, anchors.dtype, target, tiles, workspace)
            lse_k, pos_k, dots = _forward_block(plan, anchors, c, inv_a, _inverse(norm_c, eps),
                                                labels, offset, inv_temp)
            plans.append(plan)
            lse_parts.append(lse_k)
            saved_dots.append(dots)
            pos += pos_k
            offset += c.shape[0]
        lse = torch.logsumexp(torch.stack(lse_parts), dim=0)
        # Through save_for_backward, so saved-tensor hooks see everything; an empty tensor stands
        # for "no dots kept" (fused mode).
        kept = [d if d is not None else lse.new_empty(0) for d in saved_dots]
        ctx.save_for_backward(anchors, labels, lse, norm_a, *norms, *blocks, *kept)
        ctx.plans, ctx.inv_temp, ctx.eps, ctx.target = plans, inv_temp, eps, target
        return lse - pos

    @staticmethod
    def backward(ctx, grad_losses):
        anchors, labels, lse, norm_a, *rest = ctx.saved_tensors
        n_blocks = len(ctx.plans)
        norms, blocks = rest[:n_blocks], rest[n_blocks:2 * n_blocks]
        kept = [None if plan.fused else d for plan, d in zip(ctx.plans, rest[2 * n_blocks:],
                                                               strict=True)]
        rows, dim = anchors.shape
        row_scale = (grad_losses.float() * ctx.inv_temp).contiguous()
        inv_a = _inverse(norm_a, ctx.eps)
        acc_a = torch.zeros((rows, dim), dtype=torch.float32, device=anchors.device)
        t_a = torch.zeros(rows, dtype=torch.float32, device=anchors.device)
        grads_c, offset = [], 0
        for plan, c, norm_c, dots in zip(ctx.plans, blocks, norms, kept, strict=True):
            if rows and c.shape[0]:
                acc_c, t_c = _grad_block(plan, anchors, c, inv_a, _inverse(norm_c, ctx.eps),
                                         labels, offset, lse, row_scale, dots, ctx.inv_temp,
                                         acc_a, t_a)
            else:
                acc_c = torch.zeros((c.shape[0], dim), dtype=torch.float32, device=c.device)
                t_c = torch.zeros(c.shape[0], dtype=torch.float32, device=c.device)
            grads_c.append(_finish(acc_c, c, norm_c, t_c, ctx.eps, ctx.target))
            offset += c.shape[0]
        grad_a = _finish(acc_a, anchors, norm_a, t_a, ctx.eps, ctx.target)
        return (grad_a, None, None, None, None, *grads_c)


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
    target: int | None = None,
    workspace_bytes: int = _WORKSPACE_BYTES,
) -> torch.Tensor:
    """Supervised-SimCSE InfoNCE over the global batch with the fused Triton kernels.

    Same contract as :func:`pcc_dist.losses.reference_infonce.infonce_reference` (formula, global
    mean, gradient convention); computes in fp32 (fp32/bf16/fp16 inputs).

    Args:
        anchors: hᵢ, this rank's anchors.
        positives: hᵢ⁺, this rank's positives.
        hard_negatives: hᵢ⁻, or None for in-batch negatives only.
        temperature: τ.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.
        eps: Norm clamp of the cosine.
        block_b: Anchors per tile (power of two ≥ 16); None = planned (:func:`plan_block`).
        block_m: Candidates per tile (power of two ≥ 16); None = planned.
        block_d: Embedding dims per ``tl.dot`` step (power of two ≥ 16); None = 32.
        target: Programs each launch should reach; None = 2 × the GPU's SMs (an H100's off CUDA).
        workspace_bytes: Bound on the fp32 gradient panel ``[rows, M_k]`` of the backward.

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
    tiles = Tiles(block_b, block_m, block_d)
    for name, value in vars(tiles).items():
        if value is not None:
            check_tile(name, value)
    inputs = [anchors, positives] + ([hard_negatives] if hard_negatives is not None else [])
    reject_float64("InfoNCE", inputs)
    check_triton_device(anchors)

    def core(a: torch.Tensor, labels: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        options = (tiles, target or target_programs(a.device), workspace_bytes)
        return InfoNCETritonFunction.apply(a, labels, temperature, eps, options, *blocks)

    return global_infonce(
        anchors,
        positives,
        hard_negatives,
        core,
        temperature=temperature,
        group=group,
        grad_scale=grad_scale,
    )
