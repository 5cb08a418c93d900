"""Which ZeRO stage one rank trains with: ZeRO's bookkeeping only pays off across ranks.

With W = 1 a rank's partition is the whole model, so ZeRO-2/3 save no memory, yet ZeRO-3 still
runs its per-module pre-/post-forward and backward hooks (gather, release, reduce-scatter into a
partition) and its partitioned optimizer step. The issue-15 measurement on all-MiniLM-L6-v2
found +17 % forward, +20 % backward and ~80 ms per optimizer step from them.
:func:`single_rank_ds_config` therefore rewrites a one-rank run's ``zero_optimization`` to
:data:`SINGLE_RANK_STAGE` unless

* the JSON offloads parameters or optimizer state (``offload_param`` / ``offload_optimizer``
  with a device): offloading is ZeRO's, and the reason such a run uses ZeRO at all is memory;
* ``train.single_rank_keep_zero`` is true (reproduce or debug a ZeRO-3 run on one rank);
* the JSON already asks for a stage at or below :data:`SINGLE_RANK_STAGE`.

Why stage 1 and not stage 0 (see :data:`SINGLE_RANK_STAGE` for the timings): ZeRO-1 hooks no
module (gradients stay in ``param.grad`` until the step), and it keeps what the rest of
pcc_dist relies on. Its step computes the global gradient norm, skips the update on an inf/NaN
norm (the non-finite guard of :meth:`pcc_dist.engine.TrainEngine.step`; stage 0 with an fp32
model hands the step to the bare torch optimizer, which would apply a NaN update) and clips by
the same formula as ZeRO-3 (``clip = norm / max_norm``, gradients divided by it when > 1), so
trajectories agree with ZeRO-3 runs on more ranks up to summation order. And its fp32 master
partitions are what the world-size-portable checkpoint (``portable_state.pt``) is gathered from
and written back into, so a one-rank checkpoint resumes on W ranks under ZeRO-3 and back.

The choice is logged once (stage used and why) by :func:`pcc_dist.engine.build_engine`.

Why a one-rank run's losses differ from a ZeRO-3 run's in the last digits (the "1.75e-5 at
step 4" of issue 15): ``benchmarks/zero_stage_drift.py`` trains the tiny LoRA Llama from the
same weights at stages 0, 1 and 3 and compares after every step. The step-1 loss is bitwise
equal at all three; ZeRO-1's gradients and weights stay bitwise equal to stage 0's (so the flat
fp32 partition, the fused AdamW over it and the clipping path change nothing), while ZeRO-3's
gradients differ from the very first backward by up to 6.8e-7 relative, with or without the
gradient cache. The differing tensors are every LoRA tensor upstream of the last layer's MLP,
and none inside it: ZeRO-3 wraps every module's inputs and outputs in autograd functions for its
pre-/post-backward hooks, which changes the order in which autograd sums the several gradient
contributions of a tensor used more than once (the residual stream, the input shared by
q/k/v_proj), and fp32 addition is not associative. Training amplifies those ulp-level gradient
differences into loss differences of 1e-7 to 1e-6 within a few steps on this model (measured
here: at most 3.6e-7 over 5 steps, 9.5e-7 over 6 stage-1 + 6 stage-2 steps of the tiny_cpu
recipe); larger ones such as 1.75e-5 are the same drift after more steps or at a larger learning
rate (not reproduced with the tiny_cpu settings). No stage is "right": all are the same
arithmetic summed in another order, and W = 1 vs W = 2 (ZeRO-1 vs ZeRO-3) stays within the
determinism test's 1e-5.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# ZeRO stage a one-rank run without offload trains with. all-MiniLM-L6-v2 stage 2 (demo recipe,
# batch 64, fp32, one CPU process, 2 threads), the three engines in one process taking steps in
# alternation, median of 4 steps on a shared 2-core machine at load ~6: process CPU seconds per
# step 2.04 (stage 0), 2.27 (stage 1), 2.57 (ZeRO-3, parameters resident); wall 3.56 / 4.08 /
# 5.91 s. Stage 1 removes ~60 % of ZeRO-3's CPU overhead; the rest is ZeRO-1's separate fp32 copy
# (gradients flattened into it, weights copied back after the step). Stage 0 would need a
# non-finite guard, a gradient norm and a portable checkpoint of its own (the bare torch
# optimizer has none of them), so it is not the default yet.
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
