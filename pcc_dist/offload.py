"""Which optimizer runs the step and whether ZeRO-3 parameters live on the GPU.

* **Optimizer under offload** (:func:`use_deepspeed_cpu_adam`). With ``offload_optimizer`` the
  Adam step runs on the host over this rank's fp32 partition (7.2 B params / 8 ranks = 900 M
  elements per rank for the full Mistral recipe). torch's AdamW runs it on ``OMP_NUM_THREADS``
  threads, which torchrun sets to 1; DeepSpeed's ``DeepSpeedCPUAdam`` (SIMD, its own threads) is
  what DeepSpeed builds for this case. It compiles a C++ op on first use (about a minute, cached
  in ``~/.cache/torch_extensions``), so it is chosen on CUDA hosts, where a real run happens; the
  CPU-only test machines keep torch's AdamW (``train.optimizer=adamw_deepspeed`` forces it).
* **Parameter offload** (:func:`choose_param_offload`). ZeRO-3 with ``offload_param`` keeps the
  bf16 weights in host memory and copies every layer over PCIe for each gather (forward, the
  gradient cache's extra forward, backward: ~3 full-model gathers per micro step, each 14.5 GB
  for a 7.2 B model). Where the GPU holds its share anyway, that is wasted time: with W ranks a
  GPU needs ``2 N / W`` bytes of weight partition + ``4 N / W`` of fp32 gradient partition + the
  gather buffers. When that static need is at most :data:`PARAM_OFFLOAD_FRACTION` of the GPU's
  memory (leaving the rest for activations and the allocator), parameter offload is turned off
  and a log line says so. ``PCC_PARAM_OFFLOAD=keep`` keeps the JSON's choice.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Share of GPU memory the static ZeRO-3 state may take before parameters stay offloaded: the
# rest is for activations (the gradient cache bounds them to one chunk), gathered layers and
# the caching allocator's slack.
PARAM_OFFLOAD_FRACTION = 0.5
# Bytes per parameter on the GPU without parameter offload, divided over W ranks: bf16/fp16
# weight partition (2) + gradient partition accumulated in fp32 (4, data_types.grad_accum_dtype).
_BYTES_PER_PARAM = 2 + 4


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    block = zero.get(key)
    return isinstance(block, dict) and block.get("device") in ("cpu", "nvme")


def use_deepspeed_cpu_adam(optimizer: str, ds_config: dict[str, Any],
                           cuda: bool | None = None) -> bool:
    """True when the optimizer states are offloaded and this is a CUDA host (or asked for).

    Args:
        optimizer: ``train.optimizer`` (``adamw_torch`` or ``adamw_deepspeed``).
        ds_config: The resolved DeepSpeed config.
        cuda: Whether CUDA is available (default: ask torch).
    """
    offload = _offloaded(ds_config.get("zero_optimization", {}), "offload_optimizer")
    if not offload:
        return False
    if optimizer == "adamw_deepspeed":
        return True
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        logger.info("optimizer states offloaded to the host: DeepSpeedCPUAdam runs the step "
                    "(torch AdamW would run it on OMP_NUM_THREADS=%s thread(s))",
                    os.environ.get("OMP_NUM_THREADS", "unset"))
    return cuda


def param_offload_need(n_params: int, world_size: int, ds_config: dict[str, Any]) -> int:
    """Static GPU bytes per rank of ZeRO-3 without parameter offload (formula in the module
    docstring), plus the two prefetch/gather buckets of bf16 elements."""
    zero = ds_config.get("zero_optimization", {})
    bucket = int(zero.get("stage3_prefetch_bucket_size", 5 * 10**7))
    return _BYTES_PER_PARAM * n_params // world_size + 2 * 2 * bucket


def choose_param_offload(ds_config: dict[str, Any], n_params: int, world_size: int,
                         gpu_bytes: int | None) -> dict[str, Any]:
    """Drop ZeRO-3 ``offload_param`` when the GPU holds its share with room to spare.

    Args:
        ds_config: The resolved DeepSpeed config (changed in place and returned).
        n_params: Parameters of the model (all, frozen ones included: ZeRO-3 partitions them).
        world_size: Ranks W.
        gpu_bytes: Memory of this rank's GPU; None without CUDA (nothing changes).
    """
    zero = ds_config.get("zero_optimization", {})
    if gpu_bytes is None or zero.get("stage") != 3 or not _offloaded(zero, "offload_param"):
        return ds_config
    need = param_offload_need(n_params, world_size, ds_config)
    if os.environ.get("PCC_PARAM_OFFLOAD", "auto") == "keep":
        logger.info("parameter offload kept (PCC_PARAM_OFFLOAD=keep)")
        return ds_config
    if need <= PARAM_OFFLOAD_FRACTION * gpu_bytes:
        zero.pop("offload_param")
        logger.info("parameter offload off: ZeRO-3 needs %.1f GiB per GPU for %.2f B params on %d "
                    "ranks, <= %.0f%% of this GPU's %.1f GiB (PCC_PARAM_OFFLOAD=keep keeps it)",
                    need / 2**30, n_params / 1e9, world_size, 100 * PARAM_OFFLOAD_FRACTION,
                    gpu_bytes / 2**30)
    else:
        logger.info("parameter offload kept: ZeRO-3 would need %.1f GiB per GPU, > %.0f%% of "
                    "%.1f GiB", need / 2**30, 100 * PARAM_OFFLOAD_FRACTION, gpu_bytes / 2**30)
    return ds_config


def local_gpu_bytes() -> int | None:
    """Total memory of this rank's GPU (``LOCAL_RANK``), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return int(torch.cuda.get_device_properties(index).total_memory)
