"""Fused Triton kernels of the losses, installed as ``pcc_dist.kernels``.

Import the kernels as ``pcc_dist.kernels.pearson`` and ``pcc_dist.kernels.infonce``; they import
Triton at module import time. This package module itself never imports Triton, so ``import
pcc_dist.losses`` works with only torch installed: the loss modules import a kernel module only on
the Triton path.

Where Triton runs: on CUDA tensors (compiled), or on CPU tensors through Triton's interpreter
when ``TRITON_INTERPRET=1`` is set *before* the kernel modules are imported (tests only: it is
~1000× slower than torch and computes bf16 wrongly, so use fp32 there).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

__all__ = [
    "KERNEL_CHOICES",
    "interpreter_enabled",
    "require_triton",
    "resolve_kernel",
    "validate_kernel_choice",
]

logger = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "triton", "torch")

_INSTALL_HINT = "pip install triton (it is part of `pip install pcc-dist`; CUDA machines only)"


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def require_triton() -> ModuleType:
    """Import and return ``triton``, or raise ``ImportError`` naming the package to install."""
    try:
        return importlib.import_module("triton")
    except ImportError as err:
        raise ImportError(
            f"the Triton kernels need the `triton` package, which is not installed: {_INSTALL_HINT}"
        ) from err


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
