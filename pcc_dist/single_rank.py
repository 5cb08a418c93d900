"""The DeepSpeed JSON rewrites for one rank: ZeRO's bookkeeping only pays off across ranks.

With W = 1 a rank's partition is the whole model, so ZeRO-2/3 save no memory, yet ZeRO-3 still
runs its per-module pre-/post-forward and backward hooks (gather, release, reduce-scatter into a
partition) and its partitioned optimizer step, which cost time (measurements: README,
"Benchmarks"). :func:`single_rank_ds_config` therefore rewrites a one-rank run's
``zero_optimization`` to :data:`SINGLE_RANK_STAGE` unless

* the JSON offloads parameters or optimizer state (``offload_param`` / ``offload_optimizer``
  with a device): offloading is ZeRO's, and the reason such a run uses ZeRO at all is memory;
* ``train.single_rank_keep_zero`` is true (reproduce or debug a ZeRO-3 run on one rank);
* the JSON already asks for a stage at or below :data:`SINGLE_RANK_STAGE`.

Why stage 1 and not stage 0: ZeRO-1 hooks no module (gradients stay in ``param.grad`` until the
step), and it keeps what the rest of pcc_dist relies on. Its step computes the global gradient
norm, skips the update on an inf/NaN norm (the non-finite guard of
:meth:`pcc_dist.engine.TrainEngine.step`; stage 0 with an fp32 model hands the step to the bare
torch optimizer, which would apply a NaN update) and clips by the same formula as ZeRO-3
(``clip = norm / max_norm``, gradients divided by it when > 1), so trajectories agree with ZeRO-3
runs on more ranks up to summation order. And its fp32 master partitions are what the
world-size-portable checkpoint (:mod:`pcc_dist.portable_state`) is gathered from and written back
into, so a one-rank checkpoint resumes on W ranks under ZeRO-3 and back.

A one-rank run kept at ZeRO-3 (:func:`single_rank_zero3`) keeps every parameter resident instead
of re-gathering it in every forward and backward.

Why a one-rank run's losses differ from a ZeRO-3 run's in the last digits
(``benchmarks/zero_stage_drift.py`` compares the stages step by step): ZeRO-3 wraps every
module's inputs and outputs in autograd functions for its hooks, which changes the order in which
autograd sums the several gradient contributions of a tensor used more than once (the residual
stream, the input shared by q/k/v_proj), and fp32 addition is not associative. No stage is
"right": all are the same arithmetic summed in another order.

The choices are logged once (stage used and why) by :func:`pcc_dist.engine.build_engine`.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# ZeRO stage a one-rank run without offload trains with. Stage 0 would need a non-finite guard,
# a gradient norm and a portable checkpoint of its own (the bare torch optimizer has none of
# them), so it is not the default yet.
SINGLE_RANK_STAGE = 1


def _offloads(zero: dict[str, Any]) -> str | None:
    """The offload key of ``zero_optimization`` that moves something off the device, if any."""
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device") not in (None, "none"):
            return key
    return None


def single_rank_ds_config(ds_config: dict[str, Any], world_size: int,
                          keep_zero: bool) -> tuple[dict[str, Any], str | None]:
    """Lower a one-rank run's ZeRO stage to :data:`SINGLE_RANK_STAGE` where nothing needs more.

    Args:
        ds_config: The resolved DeepSpeed config (changed in place when lowered).
        world_size: W.
        keep_zero: ``train.single_rank_keep_zero``: keep the JSON's stage on one rank.

    Returns:
        The config and a sentence saying which stage is used and why (None when W > 1: the
        JSON's stage is used as written, nothing to explain).
    """
    if world_size != 1:
        return ds_config, None
    zero = ds_config.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    stage = int(zero.get("stage", 0))
    if stage <= SINGLE_RANK_STAGE:
        return ds_config, f"ZeRO stage {stage} on one rank, as the DeepSpeed JSON sets it"
    if keep_zero:
        return ds_config, (f"ZeRO stage {stage} on one rank, as the DeepSpeed JSON sets it "
                           "(train.single_rank_keep_zero=true)")
    offload = _offloads(zero)
    if offload is not None:
        return ds_config, (f"ZeRO stage {stage} on one rank: the DeepSpeed JSON sets "
                           f"zero_optimization.{offload}, which needs ZeRO")
    # Only the stage changes: bucket sizes and overlap_comm mean the same at stage 1, and the
    # stage-3-only keys (prefetch, persistence, ...) are ignored below stage 3.
    kept = {k: v for k, v in zero.items() if not k.startswith("stage3_") and k != "stage"}
    ds_config["zero_optimization"] = {"stage": SINGLE_RANK_STAGE, **kept}
    return ds_config, (f"ZeRO stage {SINGLE_RANK_STAGE} on one rank instead of the DeepSpeed "
                       f"JSON's {stage}: with W=1 a partition is the whole model, so stage "
                       f"{stage}'s per-module hooks cost time and save nothing (set "
                       "train.single_rank_keep_zero=true to keep it)")


def other_layout(saved: dict[str, Any] | None, world_size: int, zero_stage: int) -> bool:
    """Whether DeepSpeed's files in a checkpoint were cut for another world size or ZeRO stage
    than this engine's (then only the portable copy loads). One rank trains at ZeRO-1 by default
    (above), so a 1-rank checkpoint may come from stage 1 or, written
    before that default or with ``train.single_rank_keep_zero``, from stage 3. Checkpoints from
    before ``zero_stage`` was recorded were written with a portable copy exactly when they were
    partitioned, i.e. by the ZeRO-3 default then; without one, their stage is unknown and taken
    as this engine's."""
    if saved is None:
        return False
    if saved["world_size"] != world_size:
        return True
    stage = saved.get("zero_stage", 3 if saved.get("portable") else zero_stage)
    return int(stage) != zero_stage


# stage3_param_persistence_threshold that keeps every parameter whole (more elements than any
# model has).
_PERSIST_ALL = 10**15


def single_rank_zero3(ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """On one rank, keep every ZeRO-3 parameter resident instead of re-gathering it.

    With W = 1 a rank's partition of a parameter is the whole tensor, so ZeRO-3 saves no memory,
    but it still frees each parameter above ``stage3_param_persistence_threshold`` after use and
    gathers it again in every forward and backward: that path waits rather than computes
    (measured with ``benchmarks/train_throughput.py`` variant ``zero3_partitioned``). Raising
    the threshold leaves the rest of ZeRO-3 as it is (partitioned fp32 optimizer step, the
    global-norm non-finite guard, the multi-backward accumulation API, the checkpoint format).
    Not applied when parameters are offloaded (``offload_param``), where resident parameters
    would defeat the offload.

    Args:
        ds_config: The resolved DeepSpeed config (changed in place when W = 1 and stage 3).
        world_size: W.

    Returns:
        ``ds_config``.
    """
    zero = ds_config.get("zero_optimization")
    if world_size != 1 or not isinstance(zero, dict) or zero.get("stage") != 3:
        return ds_config
    offload = zero.get("offload_param")
    if isinstance(offload, dict) and offload.get("device") not in (None, "none"):
        return ds_config
    zero["stage3_param_persistence_threshold"] = _PERSIST_ALL
    logger.info("ZeRO-3 on one rank: every parameter kept resident "
                "(stage3_param_persistence_threshold=%d; a partition is the whole tensor at W=1)",
                _PERSIST_ALL)
    return ds_config
