"""Stage-2 alternatives to Pcc-tuning on the same cosines: cosine MSE and CoSENT, global batch.

Both compare xᵢ = cos(aᵢ, bᵢ) with gold scores yᵢ over the **global** batch of N pairs held by W
ranks, like :class:`~pcc_dist.losses.PearsonLoss`, so that a stage-2 arm differs from Pcc-tuning
in the objective only (``loss.stage2_objective``):

- ``cosine_mse``: L = (1/N) Σᵢ (xᵢ − yᵢ)², sentence-transformers' ``CosineSimilarityLoss``
  (``MSELoss`` on the cosines). The targets must be on the cosine's scale: the trainer feeds the
  scores as ``data.score_scaling=per_source`` leaves them (STS-B s/5, SICK-R (s−1)/4, both in
  [0, 1]; :func:`pcc_dist.data.rescale_scores`). sentence-transformers' STS-B recipe regresses
  onto s/5; we keep that for STS-B, but s/5 would put SICK-R's "unrelated" (1) at 0.2 while
  STS-B's (0) sits at 0, two targets for one meaning in the same batch; (s−1)/4 gives both
  sources the same ends. ``data.score_scaling=none`` with this objective is a config error.
- ``cosent``: L = log(1 + Σ_{(i,j): yᵢ > yⱼ} exp(λ(xⱼ − xᵢ))), over every ordered pair of the
  global batch, sentence-transformers' ``CoSENTLoss`` (scale λ = 20 there). Only the order of the
  scores matters, so any per-source monotone scaling gives the same loss.

Cross-rank wiring (:func:`global_score_objective`): the cosines and scores of all ranks are
all-gathered (2 numbers per pair, N·2 float64 in all; the embeddings never travel), every rank
evaluates the objective on the same N values in float64 and takes G = ∂L/∂x by autograd, and its
backward sends ``grad_scale · G[its rows]`` through its own cosines: no collective in backward.
The gradient convention is that of :mod:`pcc_dist.cross_rank`: the default ``grad_scale`` W
cancels DeepSpeed's/DDP's 1/W gradient average, so the averaged parameter gradient equals the
one-process gradient on the union batch; the returned value is the exact global loss on every
rank. The objectives are evaluated on N scalars, so a pure-torch implementation is the only one
(there is no Triton kernel; ``loss.kernel=triton`` with these objectives is a config error).

Memory: CoSENT's pair mask is N × N (N = 4,096 pairs: 16.8M float64 = 134 MB); stage-2 global
batches are 64–256 pairs.

References:
    CoSENT: Jianlin Su, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT",
    2022 (https://kexue.fm/archives/8847); sentence-transformers ``CoSENTLoss`` and
    ``CosineSimilarityLoss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pcc_dist.cross_rank import (
    DEFAULT_EPS,
    check_pearson_inputs,
    collective_device,
    compute_dtype,
    resolve_grad_scale,
)
from pcc_dist.distributed import all_gather_sizes, all_gather_with_grad, get_rank, get_world_size

__all__ = [
    "COSENT_DEFAULT_SCALE",
    "CoSENTLoss",
    "CosineMSELoss",
    "cosent_objective",
    "cosine_mse_objective",
    "global_score_objective",
]

# sentence-transformers' CoSENTLoss default (and Su's post): cosines in [−1, 1] times 20 give
# logit differences up to 40, sharp enough to order pairs, soft enough to keep gradients alive.
COSENT_DEFAULT_SCALE = 20.0

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_mse_objective(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L = (1/N) Σᵢ (xᵢ − yᵢ)², the mean squared error of the cosines against the targets.

    Shape:
        - x, y: ``[N]``
        - output: ``[]``
    """
    return torch.mean((x - y) ** 2)


def cosent_objective(x: torch.Tensor, y: torch.Tensor, scale: float = COSENT_DEFAULT_SCALE
                     ) -> torch.Tensor:
    """L = log(1 + Σ_{(i,j): yᵢ > yⱼ} exp(λ(xⱼ − xᵢ))), λ = ``scale``.

    Each term penalises a pair of pairs whose cosines are ordered against their scores. Computed
    as one logsumexp over the masked N × N matrix with a 0 entry for the "1 +" (stable for any
    λ·x); pairs with yᵢ ≤ yⱼ (ties included) are masked to −inf. With no ordered pair (all
    scores equal, or N = 1) the loss is log 1 = 0 with zero gradient.

    Shape:
        - x, y: ``[N]``
        - output: ``[]``
    """
    logits = scale * (x[None, :] - x[:, None])  # [i, j] = λ(xⱼ − xᵢ)
    ordered = y[:, None] > y[None, :]  # [i, j]: yᵢ > yⱼ
    masked = logits.masked_fill(~ordered, float("-inf")).reshape(-1)
    return torch.logsumexp(torch.cat([masked.new_zeros(1), masked]), dim=0)


def _cosines(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """xᵢ = aᵢ·bᵢ / (max(‖aᵢ‖, eps) max(‖bᵢ‖, eps)) in the compute dtype, with autograd.

    Shape:
        - a, b: ``[B, D]``
        - output: ``[B]``
    """
    cdt = compute_dtype(a.dtype)
    return (F.normalize(a.to(cdt), dim=1, eps=eps) * F.normalize(b.to(cdt), dim=1, eps=eps)).sum(1)


def _gather_pairs(x: torch.Tensor, y: torch.Tensor, group: dist.ProcessGroup | None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' cosines and scores in rank order, as float64, and this rank's first row.

    Two collectives when W > 1: the per-rank row counts, then the [B, 2] (x, y) rows.

    Shape:
        - x, y: ``[B]``
        - outputs: ``[N]``, ``[N]``, int
    """
    pairs = torch.stack([x.detach().double(), y.detach().double()], dim=1)
    if get_world_size(group) == 1:
        return pairs[:, 0], pairs[:, 1], 0
    staging = pairs.to(collective_device(group, pairs.device))
    sizes = [row[0] for row in all_gather_sizes([pairs.shape[0]], group, staging.device)]
    gathered = all_gather_with_grad(staging, group, sizes).to(x.device)
    return gathered[:, 0], gathered[:, 1], sum(sizes[: get_rank(group)])


class _InjectGradient(torch.autograd.Function):
    """Forward returns the global loss value; backward sends ``grad · G_local`` to the cosines.

    ``G_local`` is the precomputed ``grad_scale · ∂L/∂x`` of this rank's rows, so the backward is
    one multiplication and no collective.
    """

    @staticmethod
    def forward(ctx, x_local, value, grad_local):
        ctx.save_for_backward(grad_local)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_local,) = ctx.saved_tensors
        return grad_output * grad_local, None, None


def global_score_objective(
    a: torch.Tensor,
    b: torch.Tensor,
    scores: torch.Tensor,
    objective: Objective,
    *,
    group: dist.ProcessGroup | None = None,
    grad_scale: float | None = None,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """``objective(x, y)`` over the global batch, xᵢ = cos(aᵢ, bᵢ); the value on every rank.

    Args:
        a: First embedding of each pair on this rank.
        b: Second embedding of each pair on this rank.
        scores: Gold score of each pair (the targets).
        objective: ``f(x, y) -> scalar`` on the N global pairs, differentiable in x
            (:func:`cosine_mse_objective`, :func:`cosent_objective`).
        group: Process group over which the batch is global; default group when None.
        grad_scale: Factor on input gradients; None = W (:mod:`pcc_dist.cross_rank`).
        eps: Norm clamp of the cosine, as ``F.normalize``.

    Returns:
        The scalar loss, identical on every rank, differentiable w.r.t. ``a`` and ``b``.

    Raises:
        ValueError: Bad shapes/dtypes, or no pair over the global batch.

    Shape:
        - a, b: ``[B, D]``
        - scores: ``[B]``
        - output: ``[]`` (dtype at least float32)
    """
    check_pearson_inputs(a, b, scores)
    scale = resolve_grad_scale(grad_scale, group)
    x = _cosines(a, b, eps)
    x_all, y_all, start = _gather_pairs(x, scores, group)
    if x_all.numel() == 0:
        raise ValueError("the stage-2 objective needs at least one pair over the global batch, "
                         "got 0")
    with torch.enable_grad():
        leaf = x_all.detach().requires_grad_()
        value = objective(leaf, y_all)
        (grad_all,) = torch.autograd.grad(value, leaf)
    grad_local = (grad_all[start:start + x.shape[0]] * scale).to(x.dtype)
    return _InjectGradient.apply(x, value.detach().to(x.dtype), grad_local)


class CosineMSELoss(nn.Module):
    """L = (1/N) Σᵢ (cos(aᵢ, bᵢ) − yᵢ)² over the global batch (cross-rank wiring:
    :func:`global_score_objective`).

    Args:
        eps: Norm clamp of the cosine.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.

    Shape:
        - a, b: ``[B, D]``; scores: ``[B]`` (targets in the cosine's range, e.g. [0, 1])
        - output: ``[]``

    References:
        sentence-transformers ``CosineSimilarityLoss`` (``MSELoss`` on cosines).
    """

    def __init__(self, eps: float = DEFAULT_EPS, group: dist.ProcessGroup | None = None,
                 grad_scale: float | None = None) -> None:
        super().__init__()
        self.eps, self.group, self.grad_scale = eps, group, grad_scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return global_score_objective(a, b, scores, cosine_mse_objective, group=self.group,
                                      grad_scale=self.grad_scale, eps=self.eps)


class CoSENTLoss(nn.Module):
    """L = log(1 + Σ_{(i,j): yᵢ > yⱼ} exp(λ(xⱼ − xᵢ))), xᵢ = cos(aᵢ, bᵢ), over all ordered pairs
    of the global batch (cross-rank wiring: :func:`global_score_objective`).

    Args:
        scale: λ (sentence-transformers' default 20).
        eps: Norm clamp of the cosine.
        group: Process group; default group when None.
        grad_scale: Factor on input gradients; None = W.

    Shape:
        - a, b: ``[B, D]``; scores: ``[B]`` (any monotone scale)
        - output: ``[]``

    References:
        Su, "CoSENT" (2022); sentence-transformers ``CoSENTLoss``.
    """

    def __init__(self, scale: float = COSENT_DEFAULT_SCALE, eps: float = DEFAULT_EPS,
                 group: dist.ProcessGroup | None = None, grad_scale: float | None = None) -> None:
        super().__init__()
        self.scale, self.eps, self.group, self.grad_scale = scale, eps, group, grad_scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return global_score_objective(a, b, scores, self._objective, group=self.group,
                                      grad_scale=self.grad_scale, eps=self.eps)

    def _objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cosent_objective(x, y, self.scale)
