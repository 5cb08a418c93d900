"""``PearsonLoss``: the Pcc-tuning objective 1 − r over the global batch, as an ``nn.Module``.

Kernel choice ``auto | triton | torch``: ``auto`` runs the fused Triton kernels
(:mod:`pcc_dist.kernels.pearson`) on CUDA tensors and the pure-torch reference
(:func:`pcc_dist.losses.reference_pearson.pearson_reference`) elsewhere, logging the choice once per
module and device type. Both implementations share the math, the single all-reduce of six sums, the
degenerate-case policy and the gradient convention documented in :mod:`pcc_dist.cross_rank`:
gradients are pre-multiplied by W (``grad_scale=None``) so that DeepSpeed's/DDP's gradient average
yields the union-batch gradient.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from pcc_dist.cross_rank import DEFAULT_EPS, PearsonOutput
from pcc_dist.losses.kernel_choice import resolve_kernel_once, validate_kernel_choice
from pcc_dist.losses.reference_pearson import pearson_reference

__all__ = ["PearsonLoss"]

logger = logging.getLogger(__name__)


class PearsonLoss(nn.Module):
    """L = 1 − r(x, y) with xᵢ = cos(aᵢ, bᵢ) and r Pearson's correlation over all ranks' pairs.

    Formula:
        r = Σᵢ(xᵢ − x̄)(yᵢ − ȳ) / sqrt(Σᵢ(xᵢ − x̄)² Σᵢ(yᵢ − ȳ)²), i over the N pairs of the global
        batch; L = 1 − r. One all-reduce of 6 float64 sums in forward, none in backward.

    After each forward, :attr:`last_r` holds the batch r (detached 0-dim tensor) for logging as
    ``train/pearson_r``; the forward itself returns only the loss.

    Degenerate batches (module docstring of :mod:`pcc_dist.cross_rank`): fewer than 2 pairs
    globally raise ``ValueError``; zero variance of cosines or scores gives r = 0, loss 1, zero
    gradient and a ``RuntimeWarning``.

    Args:
        kernel: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        eps: Norm clamp of the cosine, as ``F.normalize``.
        group: Process group over which the batch is global; default group when None.
        grad_scale: Factor on input gradients; None = W, which cancels DeepSpeed/DDP gradient
            averaging. Use 1.0 where gradients are summed.

    Raises:
        ValueError: Unknown ``kernel``.
        RuntimeError: ``kernel="triton"`` without CUDA (and without ``TRITON_INTERPRET=1``).
        ImportError: ``kernel="triton"`` without the ``triton`` package (``pip install triton``).

    Shape:
        - a, b: ``[B, D]`` (per-rank pairs)
        - scores: ``[B]``
        - output: ``[]``

    Example:
        >>> loss_fn = PearsonLoss(kernel="torch")
        >>> a, b = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> loss = loss_fn(a, b, torch.rand(8) * 5)
        >>> loss.backward()
        >>> bool(-1 <= loss_fn.last_r <= 1)
        True

    References:
        Pcc-tuning: "Pcc-tuning: Breaking the Contrastive Learning Ceiling in Semantic Textual
        Similarity", EMNLP 2024.
    """

    def __init__(
        self,
        kernel: str = "auto",
        eps: float = DEFAULT_EPS,
        group: dist.ProcessGroup | None = None,
        grad_scale: float | None = None,
    ) -> None:
        super().__init__()
        validate_kernel_choice(kernel)
        self.kernel = kernel
        self.eps = eps
        self.group = group
        self.grad_scale = grad_scale
        self.last_r: torch.Tensor | None = None
        self._logged: set[str] = set()

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, eps={self.eps}, grad_scale={self.grad_scale}"

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """1 − r over the global batch; sets :attr:`last_r`."""
        impl = resolve_kernel_once(f"PearsonLoss(kernel={self.kernel!r})", self.kernel,
                                   a.device, self._logged, logger)
        out = self._run(impl, a, b, scores)
        self.last_r = out.r
        return out.loss

    def _run(
        self, impl: str, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor
    ) -> PearsonOutput:
        kwargs = {"group": self.group, "grad_scale": self.grad_scale, "eps": self.eps}
        if impl == "triton":
            from pcc_dist.kernels.pearson import pearson_triton

            return pearson_triton(a, b, scores, **kwargs)
        return pearson_reference(a, b, scores, **kwargs)
