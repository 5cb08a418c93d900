"""The cross-rank contract both loss implementations share: the pure-torch oracles
(:mod:`pcc_dist.losses.reference_pearson`, :mod:`pcc_dist.losses.reference_infonce`) and the Triton
kernels (:mod:`pcc_dist.kernels.pearson`, :mod:`pcc_dist.kernels.infonce`) import it one way.

Both losses are defined on the **global** batch of N = Σ_r B_r examples held by W ranks. Neither
implementation all-gathers what it does not need: Pearson all-reduces six sums (one collective,
:func:`pearson_global_stats`), InfoNCE all-gathers the candidates (positives and hard negatives,
:func:`global_infonce`), never the logits. This module holds that wiring, the input checks and the
result records; the per-rank arithmetic (cosines, tiles) lives in the two implementations.

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

Degenerate Pearson batches, identical on every rank because they are decided on global sums
(:func:`pearson_global_stats`):
    - n < 2 over the global batch: ``ValueError`` (a correlation needs two pairs).
    - σx = 0 or σy = 0 (all cosines equal, or all gold scores equal): r is undefined (0/0). We
      return r = 0 (loss 1) with an all-zero gradient and a ``RuntimeWarning``: the batch carries
      no correlation signal, and any ε-regularised alternative would return gradients of order 1/ε.
      "Zero" means σ² ≤ 1e-12 · E[x²] (resp. y), i.e. σ/|x̄| ≤ 1e-6: below float64 rounding of the
      sums with a 500× margin, and within ~10× of the ~1e-7 relative rounding an fp32 network
      leaves in the embeddings themselves, so a smaller spread is noise, not signal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
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
    "PearsonOutput",
    "PearsonStats",
    "PerAnchorLoss",
    "check_infonce_inputs",
    "check_pearson_inputs",
    "compute_dtype",
    "global_infonce",
    "local_moment_sums",
    "pearson_global_stats",
    "resolve_grad_scale",
]

DEFAULT_EPS = 1e-8
# σ² ≤ 1e-12·E[x²] counts as zero variance: float64 sums of N ≤ 1e6 terms carry a relative error
# of about log2(N)·1.1e-16 ≈ 2e-15 of E[x²], so 1e-12 leaves a 500× margin.
_DEGENERATE_REL_VAR = 1e-12


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: at least float32 (bf16/fp16 inputs are upcast per chunk)."""
    return torch.promote_types(dtype, torch.float32)


def collective_device(group: dist.ProcessGroup | None, like: torch.device) -> torch.device:
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
    sums = local_sums.to(device=collective_device(group, local_sums.device), dtype=torch.float64)
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


# --------------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------------


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
            [anchors.shape[0], int(has_negatives)], group, collective_device(group, anchors.device)
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
