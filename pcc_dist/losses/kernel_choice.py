"""Which implementation of a loss runs: the fused Triton kernels or the pure-torch reference.

``loss.kernel`` is ``auto | triton | torch``: ``auto`` takes Triton on CUDA tensors when Triton is
installed and the reference elsewhere; ``triton`` on a machine that cannot run it is an error,
raised before any tensor exists. Never imports Triton itself (``import pcc_dist.losses`` works with
only torch installed).
"""

from __future__ import annotations

import logging

import torch

from pcc_dist.kernels._utils import interpreter_enabled, require_triton

__all__ = ["KERNEL_CHOICES", "resolve_kernel", "resolve_kernel_once", "validate_kernel_choice"]

KERNEL_CHOICES = ("auto", "triton", "torch")


def validate_kernel_choice(kernel: str) -> None:
    """Check a ``kernel`` setting before any tensor exists; fail early for an unusable ``triton``.

    Raises:
        ValueError: ``kernel`` not in :data:`KERNEL_CHOICES`.
        RuntimeError: ``triton`` requested without CUDA and without the interpreter.
        ImportError: ``triton`` requested but the package is missing.
    """
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel != "triton":
        return
    if not torch.cuda.is_available() and not interpreter_enabled():
        raise RuntimeError(
            "kernel='triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter, "
            "tests only); this machine has no CUDA device. Use kernel='auto' or kernel='torch'."
        )
    require_triton()


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The implementation to run on ``device``: ``"triton"`` or ``"torch"``.

    ``auto`` takes Triton for CUDA tensors when Triton is installed, the torch reference otherwise.
    ``triton`` is honoured for CUDA tensors, and for CPU tensors only under the interpreter.

    Raises:
        RuntimeError: ``triton`` requested for tensors it cannot run on.
    """
    validate_kernel_choice(kernel)
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            require_triton()
        except ImportError:
            return "torch"
        return "triton"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return "triton"
    raise RuntimeError(
        f"kernel='triton' cannot run on {device.type} tensors: it needs CUDA tensors, or CPU "
        "tensors with TRITON_INTERPRET=1 (tests only). Use kernel='auto' or kernel='torch'."
    )


def resolve_kernel_once(owner: str, kernel: str, device: torch.device, seen: set[str],
                        log: logging.Logger) -> str:
    """:func:`resolve_kernel`, logging the choice once per device type for ``owner``.

    Args:
        owner: Display name of the caller, e.g. ``"PearsonLoss(kernel='auto')"``.
        kernel: ``auto`` | ``triton`` | ``torch``.
        device: Device of the inputs.
        seen: The caller's set of device types already logged (updated here).
        log: The caller's module logger.
    """
    impl = resolve_kernel(kernel, device)
    if device.type not in seen:
        seen.add(device.type)
        log.info("%s on %s tensors: using the %s implementation", owner, device.type, impl)
    return impl
