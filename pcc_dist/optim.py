"""The optimizer and the learning-rate schedule of one training stage.

:func:`build_optimizer` builds AdamW (torch's, or DeepSpeed's CPU / fused Adam where the
DeepSpeed JSON or the device asks for it) over the trainable parameters, with weight decay on
matrices only (:func:`param_groups`). :class:`WarmupDecay` is the schedule: a linear warmup, then
a linear or cosine decay to 0 or a constant rate; :func:`lr_scheduler_factory` hands it to
DeepSpeed as a LambdaLR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pcc_dist.config import PccConfig, StageSettings

__all__ = ["WarmupDecay", "build_optimizer", "lr_scheduler_factory", "param_groups", "param_shape"]


class WarmupDecay:
    """Multiplier of the peak learning rate for optimizer step ``s`` (0-based), for LambdaLR.

    Warmup ramps linearly over ``warmup`` steps, ``(s + 1) / warmup``, so the first update
    already moves (lr/100 with the paper's 100 warmup steps) and step ``warmup - 1`` is at the
    peak. Then ``linear`` decays to 0 at ``total`` steps, ``cosine`` follows half a cosine to 0,
    ``constant`` stays at 1. A callable object (not a lambda) so that LambdaLR's state_dict, and
    therefore a checkpoint, records its settings.

    Args:
        warmup: Warmup steps.
        total: Optimizer steps in the stage.
        schedule: ``"linear"``, ``"cosine"`` or ``"constant"``.
    """

    def __init__(self, warmup: int, total: int, schedule: str):
        if schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, got {schedule!r}")
        self.warmup = int(warmup)
        self.total = max(int(total), 1)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def param_shape(param: nn.Parameter) -> torch.Size:
    """The full shape of ``param``, also under ZeRO-3.

    Under ``deepspeed.zero.Init`` the local tensor is an empty partition; ``ds_shape`` is the
    real one.
    """
    return getattr(param, "ds_shape", param.shape)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if len(param_shape(param)) >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter (requires_grad=True); for LoRA "
                         "check model.lora.target_modules")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: PccConfig, stage: StageSettings,
                    ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters (:func:`param_groups`), at ``stage.lr``.

    ``train.optimizer=adamw_torch`` gives torch's AdamW unless the DeepSpeed JSON offloads the
    optimizer (:func:`pcc_dist.offload.use_deepspeed_cpu_adam`); otherwise DeepSpeed's CPU Adam
    (offloaded state, or no CUDA) or its fused CUDA Adam, all in AdamW mode.
    """
    from pcc_dist.offload import use_deepspeed_cpu_adam

    groups = param_groups(model, stage.weight_decay)
    cpu_adam = use_deepspeed_cpu_adam(cfg.train.optimizer, ds_config)
    if cfg.train.optimizer == "adamw_torch" and not cpu_adam:
        # fused=True: one multi-threaded kernel per group instead of ~10 elementwise passes
        # (torch's default on CPU); the same update formula, as the HF Trainer's default
        # "adamw_torch_fused". DeepSpeed hands it the flat fp32 master partitions.
        return torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.999), eps=1e-8,
                                 fused=True)
    zero = ds_config.get("zero_optimization", {})
    offload = isinstance(zero.get("offload_optimizer"), dict) and \
        zero["offload_optimizer"].get("device") in ("cpu", "nvme")
    # DeepSpeed's Adam compiles a C++/CUDA op on first use (about a minute on CPU).
    if offload or not torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=stage.lr, adamw_mode=True)
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=stage.lr, adam_w_mode=True)


def lr_scheduler_factory(stage: StageSettings,
                         total_steps: int) -> Callable[[torch.optim.Optimizer], LambdaLR]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: a function of the optimizer that
    DeepSpeed wraps, returning a LambdaLR over :class:`WarmupDecay` for this stage.

    Args:
        stage: ``cfg.stage1`` or ``cfg.stage2`` (warmup steps, schedule).
        total_steps: Optimizer steps of the stage (the decay reaches 0 there).
    """
    factor = WarmupDecay(stage.warmup_steps, total_steps, stage.schedule)

    def make_scheduler(opt: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(opt, factor)

    return make_scheduler
