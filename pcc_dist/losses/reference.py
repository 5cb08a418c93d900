"""Pure-torch Pearson and InfoNCE over the global batch: the CPU production path and the oracle.

Both losses are defined on the **global** batch of N = Σ_r B_r examples held by W ranks. Neither
function all-gathers what it does not need: Pearson all-reduces six sums (one collective), InfoNCE
all-gathers the candidates (positives and hard negatives), never the logits.

Gradient convention across ranks (both losses):
    A rank's backward writes ``grad_scale · ∂L/∂(this rank's inputs)``, where L is the exact global
    loss and ``grad_scale`` defaults to W. Derivation of the default: let g_r be the parameter
    gradient that rank r's backward produces from its own inputs. The inputs of the ranks are
    disjoint and each rank receives ∂L/∂(its inputs) in full (Pearson: the closed form is exact
    per pair; InfoNCE: the gather's backward sums every rank's term for a candidate back to its
    owner, :class:`pcc_dist.distributed.AllGatherWithGrad`), so with grad_scale = 1,
    Σ_r g_r = ∂L/∂θ (the union-batch, one-process gradient).
    DeepSpeed and DDP *average* parameter gradients: they apply (1/W) Σ_r g_r, i.e. ∂L/∂θ / W,
    which is exactly the 1/W error of the official Pcc-tuning code. Pre-multiplying by W gives
    (1/W) Σ_r W·g_r = ∂L/∂θ. Pass ``grad_scale=1.0`` when gradients are summed rather than averaged,
    or to read the exact ∂L/∂(inputs). With one process W = 1 and nothing changes. The returned loss
    *value* is the exact global loss on every rank (the scale only touches gradients).

Degenerate cases (Pearson), identical on every rank because they are decided on global sums:
    - n < 2 over the global batch: ``ValueError`` (a correlation needs two pairs).
    - σx = 0 or σy = 0 (all cosines equal, or all gold scores equal): r is undefined (0/0). We
      return r = 0 (loss 1) with an all-zero gradient and a ``RuntimeWarning``: the batch carries
      no correlation signal, and any ε-regularised alternative would return gradients of order 1/ε.
      "Zero" means σ² ≤ 1e-12 · E[x²] (resp. y), i.e. σ/|x̄| ≤ 1e-6: below float64 rounding of the
      sums with a 500× margin, and within ~10× of the ~1e-7 relative rounding an fp32 network
      leaves in the embeddings themselves, so a smaller spread is noise, not signal.
    - Nearly equal cosines (1e-6 < σx/|x̄| ≲ 1e-4): the cosines that enter the six sums are
      computed in float64 here, so r and its gradient stay exact to ~1e-7 down to the guard. fp32
      cosines round to ~1e-7 relative, which is 7 % of σx at σx/|x̄| = 1.5e-6 and gave gradient
      errors of 8 % (tests/unit) to 22 % (issue #19). The Triton kernel keeps fp32 cosines and
      warns below σx/|x̄| = 1.2e-5 (:mod:`pcc_dist.kernels.pearson`, "Precision").
    - A zero-norm row: cosines use ``v / max(‖v‖, eps)`` like ``F.normalize``, so x_i = 0 and the
      gradient follows that clamp (finite).

References:
    - Pcc-tuning: "Pcc-tuning: Breaking the Contrastive Learning Ceiling in Semantic Textual
      Similarity", EMNLP 2024.
    - SimCSE: Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
      EMNLP 2021.
    - GradCache: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
      Setup", arXiv:2101.06983.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from pcc_dist.distributed import (
    all_gather_sizes,
    all_gather_with_grad,
    all_reduce_sum,
    get_rank,
    get_world_size,
)

__all__ = [
    "DEFAULT_EPS",
    "GlobalLossValue",
    "InfoNCEFunction",
    "PearsonFunction",
    "PearsonOutput",
    "PearsonStats",
    "global_infonce",
    "infonce_reference",
    "local_moment_sums",
    "pearson_global_stats",
    "pearson_reference",
    "resolve_grad_scale",
]

DEFAULT_EPS = 1e-8
# σ² ≤ 1e-12·E[x²] counts as zero variance: float64 sums of N ≤ 1e6 terms carry a relative error
# of about log2(N)·1.1e-16 ≈ 2e-15 of E[x²], so 1e-12 leaves a 500× margin.
_DEGENERATE_REL_VAR = 1e-12
# Row chunk of the Pearson reference: 16 MiB per temporary, i.e. C·D = 4M fp32 or 2M float64
# elements (a [65,536 × 4,096] product would otherwise be a 1 GiB temporary).
_PEARSON_CHUNK_BYTES = 16 << 20


def resolve_grad_scale(grad_scale: float | None, group: dist.ProcessGroup | None = None) -> float:
    """The factor applied to every input gradient: ``grad_scale``, or W when it is None.

    W cancels the 1/W of DeepSpeed/DDP gradient averaging (derivation in the module docstring).
    """
    if grad_scale is None:
        return float(get_world_size(group))
    if not math.isfinite(grad_scale) or grad_scale <= 0:
        raise ValueError(
            f"grad_scale must be a positive finite number or None (= W), got {grad_scale}"
        )
    return float(grad_scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32 (bf16/fp16 inputs are upcast per chunk)."""
    return torch.promote_types(dtype, torch.float32)


def _collective_device(group: dist.ProcessGroup | None, like: torch.device) -> torch.device:
    """Device for small staging tensors: the data's device for NCCL, CPU for gloo."""
    if get_world_size(group) > 1 and dist.get_backend(group) == "nccl":
        return like
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Pearson
# --------------------------------------------------------------------------------------------------


class PearsonOutput(NamedTuple):
    """Result of the Pearson loss.

    Attributes:
        loss: ``1 − r``, a differentiable 0-dim tensor, identical on every rank.
        r: The global-batch Pearson correlation, detached 0-dim tensor (for ``train/pearson_r``).
    """

    loss: torch.Tensor
    r: torch.Tensor


@dataclass(frozen=True)
class PearsonStats:
    """Global-batch moments (population convention) and the correlation derived from them.

    Attributes:
        n: Global number of pairs N.
        mean_x: x̄ (mean cosine).
        mean_y: ȳ (mean gold score).
        var_x: σx² (population).
        var_y: σy² (population).
        r: Pearson r, 0 when degenerate.
        degenerate: True when σx or σy is zero (see module docstring); the gradient is then zero.
    """

    n: float
    mean_x: float
    mean_y: float
    var_x: float
    var_y: float
    r: float
    degenerate: bool

    @property
    def relative_spread_x(self) -> float:
        """σx/|x̄|, the cosines' spread relative to their size (inf when x̄ = 0)."""
        return math.sqrt(self.var_x) / abs(self.mean_x) if self.mean_x else math.inf

    def x_gradient_coefficients(self) -> tuple[float, float]:
        """(α, β) such that ∂L/∂xᵢ = α·(yᵢ − ȳ) + β·(xᵢ − x̄) for L = 1 − r.

        From ∂r/∂xᵢ = (1/n)[(yᵢ − ȳ)/(σx σy) − r (xᵢ − x̄)/σx²] and ∂L/∂xᵢ = −∂r/∂xᵢ:
        α = −1/(n σx σy), β = r/(n σx²). Both are 0 for a degenerate batch.
        """
        if self.degenerate:
            return 0.0, 0.0
        sd_x, sd_y = math.sqrt(self.var_x), math.sqrt(self.var_y)
        return -1.0 / (self.n * sd_x * sd_y), self.r / (self.n * self.var_x)


def local_moment_sums(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """This rank's six Pearson sums [n, Σx, Σy, Σxy, Σx², Σy²] in float64.

    Why float64 and not a shifted/Welford form: the sums must combine across ranks by a plain SUM
    (one all-reduce). Chan's pairwise merge of per-rank (n, mean, M2) needs more than a sum, and a
    common data-dependent shift needs a collective *before* the sums. In float64 the cancellation
    in Σx²/n − x̄² costs log10(x̄²/σx²) of ~16 digits: for cosines with x̄ = 0.9, σx = 1e-3
    (ratio 8.1e5) about 10 digits survive. In fp32 the same cancellation leaves ~1 digit (≈5%
    error in σx² from the 6e-8 rounding of Σx² alone, before the log2(262,144) = 18 bits that a
    sequential fp32 sum of N = 262,144 terms loses). The cast touches N values, not N·D.

    Shape:
        - x, y: ``[B]``
        - output: ``[6]`` float64
    """
    xd, yd = x.detach().double(), y.detach().double()
    n = torch.tensor(float(xd.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([n, xd.sum(), yd.sum(), (xd * yd).sum(), (xd * xd).sum(), (yd * yd).sum()])


def pearson_global_stats(
    local_sums: torch.Tensor, group: dist.ProcessGroup | None = None
) -> PearsonStats:
    """All-reduce this rank's six sums (the loss's one collective) and derive r.

    Args:
        local_sums: ``[6]`` float64 from :func:`local_moment_sums` (or a kernel's partial sums).
        group: Process group; default group when None.

    Returns:
        The global :class:`PearsonStats`.

    Raises:
        ValueError: Fewer than two pairs over the global batch.
    """
    sums = local_sums.to(device=_collective_device(group, local_sums.device), dtype=torch.float64)
    all_reduce_sum(sums, group)
    n, s_x, s_y, s_xy, s_xx, s_yy = sums.tolist()
    if n < 2:
        raise ValueError(
            f"Pearson correlation needs at least 2 pairs over the global batch, got n = {n:g}; "
            "increase the batch size"
        )
    mean_x, mean_y = s_x / n, s_y / n
    second_x, second_y = s_xx / n, s_yy / n
    var_x = max(second_x - mean_x * mean_x, 0.0)
    var_y = max(second_y - mean_y * mean_y, 0.0)
    cov = s_xy / n - mean_x * mean_y
    degenerate_x = var_x <= _DEGENERATE_REL_VAR * second_x
    degenerate_y = var_y <= _DEGENERATE_REL_VAR * second_y
    if degenerate_x or degenerate_y:
        which = " and ".join(
            name
            for name, bad in (("cosines (σx = 0)", degenerate_x), ("scores (σy = 0)", degenerate_y))
            if bad
        )
        warnings.warn(
            f"Pearson loss: zero variance of the {which} over a global batch of {n:g} pairs; "
            "r is undefined, returning r = 0 (loss 1) with zero gradient",
            RuntimeWarning,
            stacklevel=3,
        )
        return PearsonStats(n, mean_x, mean_y, var_x, var_y, 0.0, True)
    r = min(max(cov / math.sqrt(var_x * var_y), -1.0), 1.0)
    return PearsonStats(n, mean_x, mean_y, var_x, var_y, r, False)


def check_pearson_inputs(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending shapes/dtypes for Pearson inputs."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"a and b must be [B, D] matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if scores.dim() != 1 or scores.shape[0] != a.shape[0]:
        raise ValueError(
            f"scores must be a [B] vector with B = {a.shape[0]}, got shape {tuple(scores.shape)}"
        )
    for name, t in (("a", a), ("b", b), ("scores", scores)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (a.device == b.device == scores.device):
        raise ValueError(
            f"a, b and scores must be on one device, got {a.device}, {b.device}, {scores.device}"
        )


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
        cdt = _compute_dtype(a.dtype)
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
        # sin∠(aᵢ, bᵢ), so fp32 loses only log10(1/sin) of its ~7 digits (measured: the gradient
        # stays within 1.6e-7 of float64 at σx/|x̄| = 1.5e-6).
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
        grad_scale: Factor on input gradients; None = W (module docstring, "Gradient convention").
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


# --------------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------------


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

    Allocating fresh 8–16 MiB temporaries per tile lets the CPU allocator keep freed blocks
    resident, and measured peak RSS then runs ~2× above the live working set; reusing one buffer
    per role (anchor operand, candidate operand, logit tile, ...) keeps the peak at the live size.
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
        cdt = _compute_dtype(anchors.dtype)
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


class GlobalLossValue(torch.autograd.Function):
    """Forward returns the global loss value; backward sends ``grad · scale`` to the local share.

    Each rank's graph holds its share Lᵣ (with Σᵣ Lᵣ = L); the value shown to the caller is L
    itself (the all-reduced shares), so logs agree across ranks. The scale is the W of the
    gradient convention (module docstring).
    """

    @staticmethod
    def forward(ctx, local_share, global_value, scale: float):
        ctx.scale = scale
        return global_value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.scale, None, None


def check_infonce_inputs(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None,
    temperature: float,
) -> None:
    """Raise ``ValueError`` naming the offending shapes/values for InfoNCE inputs."""
    if anchors.dim() != 2:
        raise ValueError(f"anchors must be a [B, D] matrix, got shape {tuple(anchors.shape)}")
    if positives.shape != anchors.shape:
        raise ValueError(
            f"positives must have the anchors' shape {tuple(anchors.shape)}, "
            f"got {tuple(positives.shape)}"
        )
    if hard_negatives is not None and hard_negatives.shape != anchors.shape:
        raise ValueError(
            f"hard_negatives must have the anchors' shape {tuple(anchors.shape)} (one per anchor) "
            f"or be None, got {tuple(hard_negatives.shape)}"
        )
    tensors = [("anchors", anchors), ("positives", positives)]
    if hard_negatives is not None:
        tensors.append(("hard_negatives", hard_negatives))
    for name, t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != anchors.device:
            raise ValueError(f"{name} is on {t.device} but anchors are on {anchors.device}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


PerAnchorLoss = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor]


def global_infonce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None,
    per_anchor_loss: PerAnchorLoss,
    *,
    temperature: float,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Shared cross-rank wiring of InfoNCE; ``per_anchor_loss`` is the torch or the Triton core.

    Gathers the candidate blocks (positives, then hard negatives, each in rank order) with
    :func:`all_gather_with_grad`, offsets labels by the rows held by lower ranks, sums this rank's
    per-anchor losses divided by the global N (this rank's share of the mean), and returns the
    global mean value with the gradient convention of the module docstring.

    Collectives (W > 1): one gather of (B, has_negatives) per rank, one gather per candidate
    block, one all-reduce of a scalar for the loss value; backward: one all-reduce per block.

    Args:
        anchors: This rank's anchors.
        positives: This rank's positives (row i pairs with anchor i).
        hard_negatives: This rank's hard negatives, or None for in-batch negatives only; must be
            None on all ranks or on none.
        per_anchor_loss: ``f(anchors, labels, blocks) -> [B]``, losses against the concatenated
            blocks.
        temperature: τ > 0.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.

    Returns:
        Scalar loss, the mean over the N anchors of all ranks.

    Raises:
        ValueError: Bad inputs, an empty global batch, or ranks disagreeing on hard negatives.
    """
    check_infonce_inputs(anchors, positives, hard_negatives, temperature)
    scale = resolve_grad_scale(grad_scale, group)
    world_size, rank = get_world_size(group), get_rank(group)
    has_negatives = hard_negatives is not None
    if world_size > 1:
        info = all_gather_sizes(
            [anchors.shape[0], int(has_negatives)], group, _collective_device(group, anchors.device)
        )
        if len({row[1] for row in info}) != 1:
            raise ValueError(
                "hard_negatives must be given on every rank or on none; ranks with hard negatives: "
                f"{[r for r, row in enumerate(info) if row[1]]}"
            )
        sizes = [row[0] for row in info]
    else:
        sizes = [anchors.shape[0]]
    total = sum(sizes)
    if total == 0:
        raise ValueError("InfoNCE needs at least one anchor over the global batch, got 0")
    blocks = [all_gather_with_grad(positives, group, sizes)]
    if has_negatives:
        blocks.append(all_gather_with_grad(hard_negatives, group, sizes))
    # Anchor i of rank r pairs with positive row Σ_{r' < r} B_{r'} + i of the gathered block 0.
    labels = torch.arange(anchors.shape[0], device=anchors.device) + sum(sizes[:rank])
    losses = per_anchor_loss(anchors, labels, blocks)
    local_share = losses.sum() / total
    value = (
        all_reduce_sum(local_share.detach().clone(), group)
        if world_size > 1
        else local_share.detach()
    )
    return GlobalLossValue.apply(local_share, value, scale)


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
        grad_scale: Factor on input gradients; None = W (module docstring, "Gradient convention").
        chunk_size: Tile edge C (anchors and candidates). The default 2,048 is where CPU
            matmuls reach full speed (1,024-tiles cost ~40% more CPU time here) at a fixed
            workspace of ~3·C·D + C² numbers.
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
