"""``InfoNCELoss``: supervised-SimCSE contrastive loss over the global batch, as an ``nn.Module``.

Kernel choice ``auto | triton | torch``: ``auto`` runs the fused Triton kernels
(:mod:`pcc_dist.kernels.infonce`) on CUDA tensors and the tiled pure-torch reference
(:func:`pcc_dist.losses.reference_infonce.infonce_reference`) elsewhere, logging the choice once per
module and device type. Neither materialises the [N × M] logit matrix. Both share the cross-rank
wiring and the gradient convention of :mod:`pcc_dist.cross_rank` (gradients pre-multiplied by W so
that DeepSpeed's/DDP's average yields the union-batch gradient).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from pcc_dist.cross_rank import DEFAULT_EPS
from pcc_dist.losses.kernel_choice import resolve_kernel_once, validate_kernel_choice
from pcc_dist.losses.reference_infonce import infonce_reference

__all__ = ["InfoNCELoss"]

logger = logging.getLogger(__name__)


class InfoNCELoss(nn.Module):
    """Mean of ℓᵢ over all ranks' anchors; in-batch negatives from every rank, optional hard ones.

    Formula:
        ℓᵢ = −log( exp(cos(hᵢ, hᵢ⁺)/τ) / Σⱼ [exp(cos(hᵢ, hⱼ⁺)/τ) + exp(cos(hᵢ, hⱼ⁻)/τ)] ),
        j over the N pairs of the global batch (the hⱼ⁻ terms only with hard negatives);
        L = (1/N) Σᵢ ℓᵢ over the N anchors of all ranks.

    Args:
        temperature: τ (SimCSE and Pcc-tuning use 0.05).
        kernel: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        chunk_size: Tile edge C of the torch path; its workspace is ~3·C·D + C² numbers on top
            of the O((B + M)·D) inputs and gradients.
        eps: Norm clamp of the cosine, as ``F.normalize``.
        group: Process group over which the batch is global; default group when None.
        grad_scale: Factor on input gradients; None = W, which cancels DeepSpeed/DDP gradient
            averaging. Use 1.0 where gradients are summed.

    Raises:
        ValueError: Unknown ``kernel``, τ ≤ 0 or chunk_size < 1.
        RuntimeError: ``kernel="triton"`` without CUDA (and without ``TRITON_INTERPRET=1``).
        ImportError: ``kernel="triton"`` without the ``triton`` package (``pip install triton``).

    Shape:
        - anchors, positives, hard_negatives: ``[B, D]`` (per rank; hard_negatives may be None,
          then on every rank)
        - output: ``[]``

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.05, kernel="torch")
        >>> h, h_pos = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
        >>> loss_fn(h, h_pos).backward()

    References:
        SimCSE: Gao, Yao, Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings",
        EMNLP 2021 (supervised objective). GradCache: arXiv:2101.06983 (large batches from cached
        embeddings, which this loss consumes unchanged).
    """

    def __init__(
        self,
        temperature: float = 0.05,
        kernel: str = "auto",
        chunk_size: int = 2048,
        eps: float = DEFAULT_EPS,
        group: dist.ProcessGroup | None = None,
        grad_scale: float | None = None,
    ) -> None:
        super().__init__()
        validate_kernel_choice(kernel)
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.temperature = float(temperature)
        self.kernel = kernel
        self.chunk_size = chunk_size
        self.eps = eps
        self.group = group
        self.grad_scale = grad_scale
        self._logged: set[str] = set()

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, kernel={self.kernel!r}, "
            f"chunk_size={self.chunk_size}, "
            f"grad_scale={self.grad_scale}"
        )

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Global-batch InfoNCE, identical on every rank."""
        impl = resolve_kernel_once(f"InfoNCELoss(kernel={self.kernel!r})", self.kernel,
                                   anchors.device, self._logged, logger)
        kwargs = {
            "temperature": self.temperature,
            "group": self.group,
            "grad_scale": self.grad_scale,
            "eps": self.eps,
        }
        if impl == "triton":
            from pcc_dist.kernels.infonce import infonce_triton

            return infonce_triton(anchors, positives, hard_negatives, **kwargs)
        return infonce_reference(
            anchors, positives, hard_negatives, chunk_size=self.chunk_size, **kwargs
        )
