"""Where inference runs (``pcc-eval``, ``pcc-export --verify``), and the dtype and attention that
fit that device.

Training places the model through DeepSpeed (one GPU per rank, ``LOCAL_RANK``); inference loads it
on CPU, so these entry points move it: a 7B model scored on CPU takes hours. ``auto`` is CUDA when
a GPU is visible, else CPU.

What fits the device, applied after loading:

* attention: flash-attn only runs on CUDA, so a model loaded with ``flash_attention_2`` and kept
  on CPU switches to ``sdpa`` (same result, torch's kernel);
* dtype: fp16 matmuls on CPU are slow or missing, so fp16 weights kept on CPU run in fp32; bf16
  and fp32 stay as they are on both;
* a 4-bit (QLoRA) model stays where bitsandbytes placed it at load time (it cannot be moved).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from pcc_dist.errors import PccError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(PccError, ValueError):
    """A device that this machine cannot provide; the message names the flag and the fix."""


def choose_device(requested: str = "auto", *, flag: str = "--device") -> torch.device:
    """The device to run inference on.

    Args:
        requested: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        flag: The setting's name, for messages.

    Returns:
        ``cuda:LOCAL_RANK`` (0 when unset) or ``cpu``.

    Raises:
        DeviceError: an unknown name, or CUDA asked for where there is none.
    """
    name = requested.strip().lower()
    if name not in DEVICE_CHOICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise DeviceError(f"{flag}={requested!r}: use one of {', '.join(DEVICE_CHOICES)} or "
                          "cuda:N.")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise DeviceError(f"{flag}={requested!r}, but this process sees no CUDA GPU (torch "
                          f"{torch.__version__}, CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); use "
                          f"{flag}=cpu or {flag}=auto.")
    else:
        index = int(name[5:]) if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise DeviceError(f"{flag}={requested!r}: GPU {index} does not exist (this process "
                              f"sees {torch.cuda.device_count()}).")
        device = torch.device("cuda", index)
    logger.info("inference device: %s (requested %s)", device, requested)
    return device


def _is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "is_quantized", False) or getattr(m, "hf_quantizer", None) is not None
               for m in model.modules())


def _attn_module(model: nn.Module) -> nn.Module | None:
    """The transformers model whose attention implementation can be switched."""
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            return module
    return None


def place_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` with a dtype and attention implementation that run there.

    Args:
        model: An embedder (or any module holding a transformers model).
        device: From :func:`choose_device`.

    Returns:
        The same module, moved (in place).
    """
    if _is_quantized(model):
        logger.info("4-bit model: kept where it was loaded (%s)",
                    next(model.parameters()).device)
        return model
    on_cpu = device.type == "cpu"
    hf = _attn_module(model)
    attn = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    if on_cpu and hf is not None and attn == "flash_attention_2":
        hf.set_attn_implementation("sdpa")
        logger.info("attention: flash_attention_2 needs CUDA; sdpa on %s", device)
    if on_cpu and any(p.dtype == torch.float16 for p in model.parameters()):
        model.float()
        logger.info("fp16 weights run in fp32 on CPU (fp16 matmuls are slow or missing there)")
    return model.to(device)
