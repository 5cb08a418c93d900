"""Pure-torch tiled InfoNCE over the global batch: the CPU production path and the kernels' oracle.

Supervised-SimCSE InfoNCE against the candidates of all ranks (positives, then hard negatives);
the gather, the label offsets, the global mean and the gradient convention are the shared
cross-rank wiring of :func:`pcc_dist.cross_rank.global_infonce`. This module is the per-anchor
core that wiring calls: [C × C] logit tiles with an online log-sum-exp, recomputed in backward
(:class:`InfoNCEFunction`); :mod:`pcc_dist.kernels.infonce` is its Triton twin.

References:
    - SimCSE: Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
      EMNLP 2021.
    - GradCache: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
      Setup", arXiv:2101.06983.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pcc_dist.cross_rank import DEFAULT_EPS, compute_dtype, global_infonce

__all__ = ["InfoNCEFunction", "infonce_reference"]


def _inverse_norms(
    x: torch.Tensor, eps: float, cdt: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / max(‖xᵢ‖, eps), [‖xᵢ‖ ≥ eps]) per row, in ``cdt``."""
    norm = torch.linalg.vector_norm(x, dim=1, dtype=cdt)
    return norm.clamp_min(eps).reciprocal(), (norm >= eps).to(cdt)


def _candidate_tiles(blocks: Sequence[torch.Tensor], chunk: int):
    """Yield (block index, global offset of the block, start, stop) over the virtual concat."""
    offset = 0
    for index, block in enumerate(blocks):
        for start in range(0, block.shape[0], chunk):
            yield index, offset, start, min(start + chunk, block.shape[0])
        offset += block.shape[0]


class _Workspace:
    """Reusable per-role buffers for the tile loop: one allocation each, reshaped per tile.

    Why: fresh 8–16 MiB temporaries per tile let the CPU allocator keep freed blocks resident,
    so the peak grows above the live working set; one buffer per role (anchor operand, candidate
    operand, logit tile, ...) keeps the peak at the live size.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, rows: int, cols: int) -> torch.Tensor:
        """A contiguous ``[rows, cols]`` view of the role's buffer (grown when too small)."""
        need = rows * cols
        buf = self.buffers.get(role)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=self.dtype, device=self.device)
            self.buffers[role] = buf
        return buf[:need].view(rows, cols)

    def scaled(
        self, role: str, x: torch.Tensor, scale: torch.Tensor, extra: int = 0
    ) -> torch.Tensor:
        """``x·scale[:, None]`` in the workspace dtype, plus ``extra`` columns left to the caller.

        One pass over the chunk; anchor operands are built once per anchor chunk and reused by
        every candidate tile.
        """
        out = self.get(role, x.shape[0], x.shape[1] + extra)
        torch.mul(x, scale[:, None], out=out[:, : x.shape[1]])
        return out


def _finish_normalised_grad(
    acc: torch.Tensor,
    x: torch.Tensor,
    inv: torch.Tensor,
    live: torch.Tensor,
    row_scale: torch.Tensor | None,
    chunk: int,
    workspace: _Workspace,
) -> None:
    """In place: acc ← ∂L/∂x from acc = ∂L/∂x̂ (up to ``row_scale``), through x̂ = x/max(‖x‖, eps).

    With ĝ = row_scale·acc = ∂L/∂x̂: ∂L/∂x = inv·(ĝ − live·(ĝ·x̂)·x̂), where the projection term
    exists only where the clamp is inactive (live = [‖x‖ ≥ eps]). Row-chunked: no [rows × D]
    temporary beyond one chunk.
    """
    for start in range(0, acc.shape[0], chunk):
        stop = min(start + chunk, acc.shape[0])
        grad = acc[start:stop]
        if row_scale is not None:
            grad.mul_(row_scale[start:stop, None])
        # Reuses the candidate-tile buffer ([C, D + 1] ≥ [C, D]): the tile loop is over by now.
        x_hat = workspace.scaled("candidate", x[start:stop], inv[start:stop])
        along = torch.linalg.vecdot(grad, x_hat) * live[start:stop]
        grad.sub_(x_hat.mul_(along[:, None])).mul_(inv[start:stop, None])


class InfoNCEFunction(torch.autograd.Function):
    """Per-anchor InfoNCE losses against a virtual concatenation of candidate blocks, tiled.

    Forward walks [C × C] tiles of the logit matrix with an online log-sum-exp and saves only
    the inputs, the per-row inverse norms and the B log-sum-exps. Backward recomputes each tile
    (flash-attention style). Memory is O((B + M)·D) for inputs and gradients
    plus a fixed workspace of about 3·C·D + C² numbers (40 MiB in fp32 at C = 2,048,
    D = 1,024), never O(B·M). A plain autograd loop over chunks
    would keep every chunk's logits alive for backward, which is O(B·M) again.

    Per tile the work is the matmuls plus two or three elementwise passes, because every per-row
    factor is folded into an operand built once and reused across tiles:

    - forward: logits = (â/τ)·ĉᵀ with â/τ built once per anchor chunk and ĉ once per tile,
      merged into a running max and sum per row (online log-sum-exp);
    - backward: P − onehot from ``exp([â/τ, −lse]·[ĉ, 1]ᵀ)`` (the log-sum-exp is an extra column,
      so the shift costs no pass), then ∂L/∂â += (P − δ)·ĉ and ∂L/∂ĉ += (P − δ)ᵀ·(g/τ ⊙ â);
      the incoming per-anchor gradient g/τ is applied to ∂L/∂â rows at the end, and the chain rule
      through the normalisation runs once over the (B + M)·D gradients
      (:func:`_finish_normalised_grad`).

    Inputs: ``(anchors [B, D], labels [B] int64, temperature, chunk_size, eps, *blocks)``; labels
    index the concatenation of ``blocks`` (each ``[M_k, D]``). Output: ``[B]`` losses
    ℓᵢ = logsumexpⱼ(Sᵢⱼ/τ) − S_{i,labelᵢ}/τ with Sᵢⱼ the cosine.
    """

    @staticmethod
    def forward(ctx, anchors, labels, temperature: float, chunk: int, eps: float, *blocks):
        cdt = compute_dtype(anchors.dtype)
        inv_t = 1.0 / temperature
        inv_a, live_a = _inverse_norms(anchors, eps, cdt)
        norms = [_inverse_norms(block, eps, cdt) for block in blocks]
        rows = anchors.shape[0]
        lse = torch.empty(rows, dtype=cdt, device=anchors.device)
        pos = torch.zeros_like(lse)
        ws = _Workspace(cdt, anchors.device)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            a_op = ws.scaled("anchor", anchors[start:stop], inv_a[start:stop] * inv_t)
            lab = labels[start:stop]
            run_max = torch.full((stop - start,), -math.inf, dtype=cdt, device=anchors.device)
            run_sum = torch.zeros_like(run_max)
            for index, offset, lo, hi in _candidate_tiles(blocks, chunk):
                c_op = ws.scaled("candidate", blocks[index][lo:hi], norms[index][0][lo:hi])
                logits = torch.mm(a_op, c_op.T, out=ws.get("tile", stop - start, hi - lo))
                # The positive logit is picked from whichever tile holds the label (gather +
                # where, no host sync), before the tile is overwritten in place.
                hit = (lab >= offset + lo) & (lab < offset + hi)
                col = (lab - offset - lo).clamp(0, hi - lo - 1)
                picked = logits.gather(1, col[:, None]).squeeze(1)
                pos[start:stop] = torch.where(hit, picked, pos[start:stop])
                # Online log-sum-exp: rescale the running sum whenever the row max grows.
                new_max = torch.maximum(run_max, logits.amax(dim=1))
                run_sum.mul_(torch.exp(run_max - new_max))
                run_sum += logits.sub_(new_max[:, None]).exp_().sum(1)
                run_max = new_max
            lse[start:stop] = run_max + run_sum.log()
        # Everything goes through save_for_backward (not ctx attributes) so that saved-tensor
        # hooks (offloading, memory accounting in the tests) see all of it.
        flat_norms = [t for pair in norms for t in pair]
        ctx.save_for_backward(anchors, labels, lse, inv_a, live_a, *flat_norms, *blocks)
        ctx.n_blocks = len(blocks)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return lse - pos

    @staticmethod
    def backward(ctx, grad_losses):
        anchors, labels, lse, inv_a, live_a, *rest = ctx.saved_tensors
        flat_norms, blocks = rest[: 2 * ctx.n_blocks], rest[2 * ctx.n_blocks :]
        norms = list(zip(flat_norms[::2], flat_norms[1::2], strict=True))
        inv_t, chunk = ctx.inv_t, ctx.chunk
        cdt = lse.dtype
        dim = anchors.shape[1]
        ws = _Workspace(cdt, anchors.device)
        # ∂ℓᵢ/∂Sᵢⱼ = (Pᵢⱼ − δ(j, labelᵢ))·gᵢ/τ, gᵢ the incoming gradient of ℓᵢ.
        row_scale = grad_losses.to(cdt) * inv_t
        acc_a = torch.zeros(anchors.shape, dtype=cdt, device=anchors.device)
        acc_blocks = [torch.zeros(b.shape, dtype=cdt, device=b.device) for b in blocks]
        for start in range(0, anchors.shape[0], chunk):
            stop = min(start + chunk, anchors.shape[0])
            ia = inv_a[start:stop]
            a_aug = ws.scaled("anchor", anchors[start:stop], ia * inv_t, extra=1)
            a_aug[:, dim] = -lse[start:stop]
            weighted = ws.scaled("weighted", anchors[start:stop], ia * row_scale[start:stop])
            lab = labels[start:stop]
            for index, offset, lo, hi in _candidate_tiles(blocks, chunk):
                ic = norms[index][0][lo:hi]
                c_aug = ws.scaled("candidate", blocks[index][lo:hi], ic, extra=1)
                c_aug[:, dim] = 1.0
                prob = torch.mm(a_aug, c_aug.T, out=ws.get("tile", stop - start, hi - lo)).exp_()
                hit = ((lab >= offset + lo) & (lab < offset + hi)).to(cdt)
                col = (lab - offset - lo).clamp(0, hi - lo - 1)
                prob.scatter_add_(1, col[:, None], -hit[:, None])
                acc_a[start:stop].addmm_(prob, c_aug[:, :dim])
                acc_blocks[index][lo:hi].addmm_(prob.T, weighted)
        _finish_normalised_grad(acc_a, anchors, inv_a, live_a, row_scale, chunk, ws)
        for acc, block, (inv, live) in zip(acc_blocks, blocks, norms, strict=True):
            _finish_normalised_grad(acc, block, inv, live, None, chunk, ws)
        grads_blocks = [g.to(b.dtype) for g, b in zip(acc_blocks, blocks, strict=True)]
        return (acc_a.to(anchors.dtype), None, None, None, None, *grads_blocks)


def infonce_reference(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
    chunk_size: int = 2048,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """Supervised-SimCSE InfoNCE over the global batch, tiled pure torch (CPU path and oracle).

    Formula:
        ℓᵢ = −log( exp(cos(hᵢ, hᵢ⁺)/τ) / Σⱼ [exp(cos(hᵢ, hⱼ⁺)/τ) + exp(cos(hᵢ, hⱼ⁻)/τ)] ),
        j over the N pairs of all ranks (the hⱼ⁻ terms only with hard negatives);
        L = (1/N) Σᵢ ℓᵢ over the N anchors of all ranks.

    Memory is O((B + M)·D + C·D + C²) for M = N or 2N candidates: [C × C] tiles with an online
    log-sum-exp, recomputed in backward (:class:`InfoNCEFunction`).

    Args:
        anchors: hᵢ, this rank's anchors.
        positives: hᵢ⁺, this rank's positives.
        hard_negatives: hᵢ⁻, this rank's hard negatives, or None (in-batch negatives only).
        temperature: τ.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W (:mod:`pcc_dist.cross_rank`, "Gradient
            convention").
        chunk_size: Tile edge C (anchors and candidates). The default 2,048 is where CPU
            matmuls reach full speed, at a fixed workspace of ~3·C·D + C² numbers.
        eps: Norm clamp of the cosine, as ``F.normalize``.

    Returns:
        Scalar loss, identical on every rank.

    Raises:
        ValueError: Bad shapes/dtypes, τ ≤ 0, chunk_size < 1, or an empty global batch.

    Shape:
        - anchors, positives, hard_negatives: ``[B, D]``
        - output: ``[]``

    References:
        SimCSE (EMNLP 2021), supervised objective; GradCache (arXiv:2101.06983) for using it with
        cached embeddings.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")

    def core(a: torch.Tensor, labels: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        return InfoNCEFunction.apply(a, labels, temperature, chunk_size, eps, *blocks)

    return global_infonce(
        anchors,
        positives,
        hard_negatives,
        core,
        temperature=temperature,
        group=group,
        grad_scale=grad_scale,
    )
