"""Host and GPU memory between the two training stages.

Two things the full 7B recipe needs on a node of 8 ranks:

* **Free stage 1 before stage 2 builds its engine** (:func:`release_engine`). A DeepSpeed engine
  holds the partitioned fp32 master weights, Adam moments (in pinned host memory under
  offload), gradient buffers and hooks on the model; while any of it is referenced, stage 2's
  engine comes on top: 7.2 B params x 12 bytes / 8 ranks = 11 GB per rank, 87 GB per node, twice.
* **Warm-start stage 2 from each rank's own shard** (:func:`load_zero3_weights`). DeepSpeed's
  module-only load under ZeRO-3 rebuilds the whole fp32 model on *every* rank
  (``get_fp32_state_dict_from_zero_checkpoint``: 7.2 B x 4 bytes = 29 GB per rank, 230 GB per
  node) and then keeps 1/W of it. Instead each rank reads only its own
  ``zero_pp_rank_<r>_..._optim_states.pt`` (memory-mapped, so only the fp32 weight partition is
  read, not the Adam moments stored beside it), copies that partition into its fp32 master and
  model copies, and leaves the optimizer fresh: 29 GB / W = 3.6 GB per rank.

Both use DeepSpeed internals (``DeepSpeedEngine._load_zero_checkpoint``, the optimizer's
checkpoint prologue/epilogue); ``setup.py`` pins DeepSpeed below 0.20 for that reason.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from pcc_dist.safe_loading import weights_only_engine_loads

logger = logging.getLogger(__name__)


def load_zero3_weights(ds_engine: Any, folder: Path, tag: str, world_size: int) -> None:
    """Load only the trainable weights of a ZeRO-3 checkpoint written on ``world_size`` ranks,
    each rank from its own partition file; the optimizer and schedule stay fresh.

    Frozen parameters (a LoRA base) are not in the checkpoint and keep the values they were
    loaded with. A collective call (the optimizer's prologue/epilogue re-partition parameters).

    Raises:
        FileNotFoundError: the folder holds no partition file for this rank.
    """
    opt = ds_engine.optimizer
    # _load_zero_checkpoint names the files by the writer's data-parallel size.
    ds_engine.loaded_checkpoint_dp_world_size = world_size
    if hasattr(opt, "checkpoint_event_prologue"):
        opt.checkpoint_event_prologue()
    with weights_only_engine_loads(ds_engine.checkpoint_engine, mmap=True):
        found = ds_engine._load_zero_checkpoint(str(folder), tag, load_optimizer_states=False)
    if hasattr(opt, "checkpoint_event_epilogue"):
        opt.checkpoint_event_epilogue()
    if not found:
        raise FileNotFoundError(f"{folder}/{tag} holds no ZeRO partition files")
    logger.info("warm start: trainable weights of %s loaded from this rank's partition (ZeRO-3, "
                "%d ranks); fresh optimizer and schedule", folder, world_size)


def release_engine(engine: Any) -> None:
    """Free what a finished stage's engine holds, before the next stage builds its own.

    ``DeepSpeedEngine.destroy`` removes the optimizer's hooks and unpins its buffers, but in
    DeepSpeed 0.19.8 the ZeRO-3 engine, optimizer and model stay reachable afterwards from
    references held in C++ (the partitioned parameters' autograd hooks; measured: weak references
    to all three are still alive after ``destroy`` and ``gc.collect``). So the tensors are let go
    of explicitly: Adam's moments, the fp32 master partitions and gradient buffers of the
    optimizer, and every parameter's data and ZeRO-3 partition of the model, which the finished
    stage never uses again. The caller drops its own references to the engine and the model.
    """
    ds_engine = getattr(engine, "deepspeed_engine", None)
    if ds_engine is None:
        return
    module = ds_engine.module
    opt = ds_engine.optimizer
    ds_engine.destroy()
    inner = getattr(opt, "optimizer", None)
    if inner is not None and hasattr(inner, "state"):
        inner.state.clear()
    if opt is not None:
        for attr, value in list(vars(opt).items()):
            if _holds_tensors(value):
                setattr(opt, attr, None)
    empty = torch.empty(0)
    for param in module.parameters():
        param.data = empty
        if hasattr(param, "ds_tensor"):
            param.ds_tensor = None
        param.grad = None
    for attr in ("optimizer", "basic_optimizer", "lr_scheduler"):
        if hasattr(ds_engine, attr):
            setattr(ds_engine, attr, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _holds_tensors(value: Any) -> bool:
    """A tensor, or a list/tuple/dict whose first items include one (the optimizer's buffers)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value[:4])
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in list(value.values())[:4])
    return False
