"""Helpers shared by the Triton kernel modules: importing Triton, where it runs, input layout
and dtype.

This module never imports Triton itself, so ``pcc_dist.losses`` can use :func:`interpreter_enabled`
and :func:`require_triton` with only torch installed.

Where Triton runs: on CUDA tensors (compiled), or on CPU tensors through Triton's interpreter
when ``TRITON_INTERPRET=1`` is set *before* the kernel modules are imported (tests only: it is
~1000× slower than torch and computes bf16 wrongly, so use fp32 there).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

INSTALL_HINT = "pip install 'pcc-dist[triton]' (Triton, an optional extra; CUDA machines only)"


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def require_triton() -> ModuleType:
    """Import and return ``triton``, or raise ``ImportError`` naming the package to install."""
    try:
        return importlib.import_module("triton")
    except ImportError as err:
        raise ImportError(
            f"the Triton kernels need the `triton` package, which is not installed: {INSTALL_HINT}"
        ) from err


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (what the kernels' pointer math assumes),
    else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_triton_device(t: torch.Tensor) -> None:
    """Raise ``RuntimeError`` when Triton cannot run on ``t``'s device."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreter_enabled()):
        return
    raise RuntimeError(
        "the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, tests "
        f"only), got {t.device.type} tensors; use kernel='torch'"
    )


def reject_float64(loss: str, tensors: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` when any input is float64: the kernels compute in fp32, and silently
    rounding a float64 caller's inputs would hide that (the torch path keeps float64)."""
    if any(t.dtype == torch.float64 for t in tensors):
        raise ValueError(
            f"the Triton {loss} kernels compute in fp32; use kernel='torch' for float64 inputs"
        )
