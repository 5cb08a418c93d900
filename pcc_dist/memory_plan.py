"""Memory and disk a run needs, computed from the model's parameter counts and what the code does.

Used by the free-space preflight (:func:`checkpoint_bytes`) and by
``benchmarks/memory_table.py`` (the README's per-recipe table). Every figure is computed, not
measured; activations are left out (the gradient cache bounds them to one chunk of C sequences).

What the code does, per rank r of W, with N parameters of which T are trainable:

* weights: every rank loads the whole model in ``model.dtype`` on the host (no ``zero.Init``),
  then DeepSpeed keeps ``N / W`` of it per rank (ZeRO-3) or all of it (ZeRO-0/1/2). A QLoRA base
  is NF4 (counted for every frozen parameter, though embeddings and norms stay in
  ``model.dtype``: 2 % of a 7B model): 0.5 byte per parameter plus one fp32 absmax per 64;
  it is loaded straight onto each GPU (the whole NF4 model once per GPU, before partitioning);
* gradients: ``T / W`` (ZeRO-2/3) in fp32 (``data_types.grad_accum_dtype``, bf16 runs too);
* optimizer: fp32 master + Adam m and v = 12 bytes x ``T / W``, on the GPU or, with
  ``offload_optimizer``, in pinned host memory;
* checkpoint: DeepSpeed's partition files hold the 12 bytes x T (whatever W); ZeRO-0/1/2 add the
  weights in ``model.dtype`` (trainable only for LoRA); a trainable state up to
  ``PORTABLE_MAX_NUMEL`` gets a portable fp32 copy with its moments (12 bytes x T more);
* disk: ``keep_last`` complete checkpoints plus the one being written (the old ones are pruned
  after the new one is complete), plus the final model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
NF4_BYTES = 0.5 + 4 / 64  # packed 4-bit + one fp32 absmax per block of 64 (before double quant)


def _meta_model(hf_config: Any) -> nn.Module:
    """``AutoModel`` (no LM head) of the architecture, on the meta device: shapes only, no
    memory, no download."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(hf_config)


def _lora_trainable(model: nn.Module, r: int, targets: list[str] | None) -> int:
    """LoRA A (r x in) + B (out x r) on every targeted linear layer (default: every linear layer
    but ``lm_head``, as :func:`pcc_dist.modeling.lora.lora_target_modules` picks)."""
    from pcc_dist.modeling.lora import lora_target_modules

    wanted = targets or lora_target_modules(model)
    total = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (leaf in wanted or name in wanted):
            total += r * (module.in_features + module.out_features)
    return total


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the backbone (N) and the trainable ones (T)."""

    total: int
    trainable: int


def count_params(hf_config: Any, mode: str, lora_r: int = 64,
                 lora_targets: list[str] | None = None) -> ParamCounts:
    """N and T for ``model.mode`` ``full``, ``lora`` or ``qlora``; LoRA adds its T to N."""
    model = _meta_model(hf_config)  # built once: the total and the LoRA shapes both read it
    total = sum(p.numel() for p in model.parameters())
    if mode == "full":
        return ParamCounts(total, total)
    lora = _lora_trainable(model, lora_r, lora_targets)
    return ParamCounts(total + lora, lora)


def checkpoint_bytes(counts: ParamCounts, zero_stage: int, dtype: str, mode: str) -> int:
    """Bytes of one checkpoint folder (all ranks' files together); formula in the module
    docstring."""
    from pcc_dist.portable_state import PORTABLE_MAX_NUMEL

    t = counts.trainable
    size = ADAM_BYTES * t
    if zero_stage < 3:
        weights = t if mode != "full" else counts.total
        size += DTYPE_BYTES[dtype] * weights
    if zero_stage >= 1 and t <= PORTABLE_MAX_NUMEL:
        size += ADAM_BYTES * t
    return size


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank GPU, per-node host and per-run disk bytes of one recipe (see module docstring)."""

    params_total: int
    params_trainable: int
    world_size: int
    gpu_per_rank: int
    host_per_node_steady: int
    host_per_node_load_peak: int
    checkpoint: int
    disk_per_stage: int
    final_model: int
    param_offload: bool
    optimizer_offload: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_memory(counts: ParamCounts, *, mode: str, dtype: str, zero_stage: int, world_size: int,
                ranks_per_node: int, optimizer_offload: bool, param_offload: bool,
                keep_last: int) -> MemoryPlan:
    """The figures of one recipe on ``world_size`` ranks, ``ranks_per_node`` per node."""
    n, t, w = counts.total, counts.trainable, world_size
    frozen = n - t
    weight_bytes = (NF4_BYTES * frozen + DTYPE_BYTES[dtype] * t if mode == "qlora"
                    else DTYPE_BYTES[dtype] * n)
    weights_share = weight_bytes / w if zero_stage == 3 else weight_bytes
    grads = 4 * t / w if zero_stage >= 2 else 4 * t
    optim = ADAM_BYTES * t / w if zero_stage >= 1 else ADAM_BYTES * t
    gpu = (0 if param_offload else weights_share) + grads + (0 if optimizer_offload else optim)
    host_steady = ranks_per_node * ((optim if optimizer_offload else 0)
                                    + (weights_share if param_offload else 0))
    # Each rank reads the whole model into host memory before DeepSpeed partitions it; a QLoRA
    # base is quantised as it is placed on the GPU (device_map), so it has no host copy.
    load_peak = host_steady + (0 if mode == "qlora" else ranks_per_node * weight_bytes)
    ckpt = checkpoint_bytes(counts, zero_stage, dtype, mode)
    final = DTYPE_BYTES[dtype] * n if mode == "full" else 4 * t
    return MemoryPlan(params_total=n, params_trainable=t, world_size=w,
                      gpu_per_rank=int(gpu), host_per_node_steady=int(host_steady),
                      host_per_node_load_peak=int(load_peak), checkpoint=int(ckpt),
                      disk_per_stage=int((keep_last + 1) * ckpt), final_model=int(final),
                      param_offload=param_offload, optimizer_offload=optimizer_offload)


# Free space asked for when nothing better is known (a run folder as the model, an unreadable
# config): the smallest useful checkpoint.
FALLBACK_FREE_BYTES = 64 * 2**20


def _folder_bytes(folder: Any) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def checkpoint_space_needed(cfg: Any, hf_config: Any = None) -> tuple[int, str]:
    """Free bytes ``run.output_dir`` needs for the checkpoints still to be written, and how that
    was found (for the error message).

    The size of one checkpoint is the largest complete one already in the run folder (its real
    size on disk), else :func:`checkpoint_bytes` from the model's parameter counts. The run
    holds ``keep_last`` of them plus the one being written; those already there count.
    ``hf_config``: the model's config when the caller has read it already (else it is read).
    """
    from pathlib import Path

    folder = Path(cfg.run.output_dir)
    existing = [p for p in folder.glob("stage*/checkpoints/step-*") if p.is_dir()]
    slots = cfg.checkpoint.keep_last + 1
    if existing:
        largest = max(existing, key=_folder_bytes)
        size, how = _folder_bytes(largest), f"the size of {largest}"
        count = max(1, slots - max(sum(1 for p in existing if p.parent == c.parent)
                                   for c in existing))
    else:
        estimated = _estimated_checkpoint(cfg, hf_config)
        if estimated is None:
            return FALLBACK_FREE_BYTES, "the smallest useful checkpoint"
        size, how = estimated, "computed from the parameter count (pcc_dist.memory_plan)"
        count = slots
    return size * count, (f"{count} checkpoint(s) of {size / 2**30:.2f} GiB: keep_last="
                          f"{cfg.checkpoint.keep_last} + the one being written; size {how}")


def _estimated_checkpoint(cfg: Any, hf_config: Any = None) -> int | None:
    import json

    from pcc_dist.ds_config import find_ds_config
    from pcc_dist.modeling import ModelError, plan_model

    try:
        hf_config = hf_config if hf_config is not None else plan_model(cfg.model).hf_config
        stage = int(json.loads(find_ds_config(cfg.train.deepspeed_config).read_text())
                    .get("zero_optimization", {}).get("stage", 0))
    except (ModelError, OSError, ValueError):
        return None  # the model and DeepSpeed checks of the same preflight report the problem
    if hf_config is None:
        return None
    m = cfg.model
    counts = count_params(hf_config, m.mode, m.lora.r, m.lora.target_modules)
    return checkpoint_bytes(counts, stage, m.dtype, m.mode)
