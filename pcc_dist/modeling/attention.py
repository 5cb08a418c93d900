"""Attention implementation choice: ``auto | sdpa | eager | flash_attention_2``."""

from __future__ import annotations

import importlib.util
import logging

import torch

from pcc_dist.modeling._core import ModelError, _check_choice

logger = logging.getLogger(__name__)


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")

_GPU_EXTRA_HINT = "pip install pcc-dist[gpu]"


def choose_attn_implementation(
    requested: str, dtype: torch.dtype, device: str | None = None
) -> str:
    """Pick the attention implementation and log the choice.

    ``auto`` takes flash_attention_2 when flash-attn is importable, CUDA is available and the dtype
    is half precision (flash-attn has no fp32 kernels); otherwise sdpa.

    Raises:
        ModelError: ``flash_attention_2`` requested but flash-attn is missing, or no CUDA device.
    """
    _check_choice("model.attn_implementation", requested, ATTN_IMPLEMENTATIONS)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if requested == "flash_attention_2":
        if not has_flash:
            raise ModelError(
                "model.attn_implementation='flash_attention_2' but flash-attn is not installed: "
                f"{_GPU_EXTRA_HINT} (CUDA machines only), or use model.attn_implementation='sdpa'."
            )
        if not on_cuda:
            raise ModelError(
                "model.attn_implementation='flash_attention_2' needs a CUDA device; this process "
                "has none. Use model.attn_implementation='sdpa'."
            )
        choice = requested
    elif requested == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        choice = "flash_attention_2" if (has_flash and on_cuda and half) else "sdpa"
    else:
        choice = requested
    logger.info(
        "attention implementation: %s (requested %s; flash-attn %s, CUDA %s)",
        choice,
        requested,
        "installed" if has_flash else "missing",
        "available" if on_cuda else "unavailable",
    )
    return choice
