"""The training engine: the step and checkpoint API over DeepSpeed, and :func:`build_engine`.

:func:`build_engine` fills the run's DeepSpeed JSON (:func:`pcc_dist.ds_config.resolve_ds_config`,
then the one-rank rewrites of :mod:`pcc_dist.single_rank` and :mod:`pcc_dist.offload`) and wraps
``deepspeed.initialize`` with the optimizer and schedule of :mod:`pcc_dist.optim` and the
non-finite guard. It returns a :class:`TrainEngine`, the small surface the trainer, the gradient
cache and the checkpoint code use: forward, backward, step, save and load. The world-size-portable
part of a checkpoint is :mod:`pcc_dist.portable_state`; the process group is
:func:`pcc_dist.distributed.init_distributed`.

DeepSpeed is imported lazily, inside functions, so that ``import pcc_dist`` and everything above
the engine work with torch alone.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcc_dist.config import PccConfig, StageSettings
from pcc_dist.distributed import DistInfo, import_deepspeed, init_distributed
from pcc_dist.ds_config import resolve_ds_config
from pcc_dist.optim import build_optimizer, lr_scheduler_factory
from pcc_dist.portable_state import PortableState
from pcc_dist.safe_loading import weights_only_engine_loads
from pcc_dist.single_rank import single_rank_ds_config, single_rank_zero3

logger = logging.getLogger(__name__)

# DeepSpeed writes <folder>/<tag>/… and <folder>/latest; one fixed tag per folder, because the
# checkpoint manager already names folders by step.
_CHECKPOINT_TAG = "state"


@dataclass(frozen=True)
class StepResult:
    """Outcome of one optimizer step.

    Attributes:
        grad_norm: Global L2 norm of the gradient before clipping (inf when skipped, nan when
            DeepSpeed did not compute it).
        skipped: True when the step was skipped on every rank (a non-finite loss or gradient
            norm on any rank); weights, optimizer and schedule did not move.
        lr: Learning rate this step used (of the first parameter group).
    """

    grad_norm: float
    skipped: bool
    lr: float


class TrainEngine:
    """The training surface over a ``deepspeed.DeepSpeedEngine``.

    One optimizer step is: for each of ``grad_accum_steps`` micro batches, forward through the
    engine (``engine(**batch)``) and call :meth:`backward` one or more times, the last time with
    ``boundary=True``; then :meth:`step` once.

    Several backward calls per micro batch (the gradient cache) use DeepSpeed's supported
    multi-backward path: before every backward we call
    ``DeepSpeedEngine.set_gradient_accumulation_boundary(b)`` with ``b`` True only for the last
    backward of the last micro batch. Under ZeRO-3 each backward reduce-scatters its gradient
    into this rank's partition and accumulates there (``micro_step_id > 0``); under ZeRO-1/2 a
    non-boundary backward accumulates instead of resetting the partition buffer. ``no_sync()``
    is no alternative: it asserts on ZeRO-2/3. ``coalesce_grad_reduction()`` (in 0.19.8: one
    reduction per step instead of one per backward) is not used either: it keeps every
    gradient whole and unpartitioned on each rank until the flush, which gives back the memory
    ZeRO-3 saves (28 GB of fp32 gradients for a 7B model).

    Args:
        ds_engine: The DeepSpeed engine.
        ds_config: The resolved DeepSpeed config.
        dist_info: This process's place in the job.

    Attributes:
        module: The wrapped model (the nn.Module; call the engine itself to run a forward).
        world_size: W.
        rank: This rank.
        grad_accum_steps: Micro batches per optimizer step.
        ds_config: The resolved DeepSpeed config (for logging).
    """

    def __init__(self, ds_engine: Any, ds_config: dict[str, Any], dist_info: DistInfo):
        self._ds = ds_engine
        self.ds_config = ds_config
        self.world_size = dist_info.world_size
        self.rank = dist_info.rank
        self.grad_accum_steps = int(ds_engine.gradient_accumulation_steps())
        self.zero_stage = int(ds_engine.zero_optimization_stage())
        self._micro_done = 0  # micro batches closed (boundary=True) since the last step
        self._grad_forwards = 0  # engine forwards with autograd since the last backward
        self._has_frozen = any(not p.requires_grad for p in self.module.parameters())

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._ds.module

    @property
    def deepspeed_engine(self) -> Any:
        """The underlying ``DeepSpeedEngine`` (for tests and diagnostics)."""
        return self._ds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward through DeepSpeed.

        A backward needs it: ``DeepSpeedEngine.forward`` registers the hooks that open the ZeRO
        backward and advances ZeRO-3's ``micro_step_id``, which decides whether a backward
        overwrites (first) or accumulates into the gradient partition. A raw ``module(...)``
        forward followed by a second backward would silently overwrite the first one's gradient.
        """
        if torch.is_grad_enabled():
            self._grad_forwards += 1
        return self._ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, boundary: bool,
                 loss_value: float | None = None) -> None:
        """Back-propagate ``loss`` into the (partitioned) gradients.

        Scaling: DeepSpeed divides every backward by ``grad_accum_steps`` A (``scale_wrt_gas``).
        Division is linear, so several backward calls for one micro batch (chunks k = 1..K whose
        gradients g_k sum to the micro batch's g) still add up to Σ g_k / A = g / A, i.e. the
        division is effectively applied once per micro batch. Example: A = 2, K = 4 chunks with
        g_k = 1 each -> each call contributes 0.5, the micro batch 2.0 = 4 / 2. pcc_dist runs
        A = 1 (see :func:`resolve_ds_config`), where the division is the identity. Averaging over
        W ranks happens in DeepSpeed's reduce-scatter; the losses pre-scale by W for it.

        Args:
            loss: Scalar with autograd history, produced after an engine forward.
            boundary: True for the last backward of this micro batch.
            loss_value: The value of the real loss when ``loss`` is a surrogate (the gradient
                cache back-propagates ``<embedding, cached gradient>``); defaults to
                ``loss.item()``. A non-finite value makes this rank's gradient NaN so that
                DeepSpeed's global norm check skips the step on every rank.

        Raises:
            RuntimeError: when no forward went through the engine since the last backward, or
                when more micro batches close than the accumulation expects.
        """
        if self._grad_forwards == 0:
            raise RuntimeError(
                "TrainEngine.backward: no forward with autograd went through the engine since "
                "the last backward; run the model as engine(**batch), not engine.module(...), "
                "or ZeRO-3 overwrites instead of accumulating the gradient.")
        if self._micro_done >= self.grad_accum_steps:
            raise RuntimeError(
                f"TrainEngine.backward: {self._micro_done} micro batches already closed and "
                f"grad_accum_steps is {self.grad_accum_steps}; call step() first.")
        value = float(loss.detach().float().item()) if loss_value is None else float(loss_value)
        if not math.isfinite(value):
            # A non-finite loss with finite gradients would otherwise update the weights. NaN
            # gradients flow through DeepSpeed's reduce-scatter into every rank's partition and
            # its all-reduced global norm, so every rank skips the same step.
            logger.warning("rank %d: non-finite loss %s; the step will be skipped on every rank",
                           self.rank, value)
            loss = loss * float("nan")
        last = boundary and self._micro_done + 1 == self.grad_accum_steps
        self._ds.set_gradient_accumulation_boundary(last)
        self._ds.backward(loss)
        self._grad_forwards = 0
        if boundary:
            self._micro_done += 1

    def step(self) -> StepResult:
        """Apply the optimizer step (or skip it on every rank) and advance the schedule.

        Non-finite guard: DeepSpeed 0.19 computes the global gradient norm (an all-reduce, so
        every rank sees the same number) before updating; an inf/NaN norm makes every rank skip
        the update, the schedule and zero the gradients (``was_step_applied()`` is False). A
        non-finite loss on any rank is turned into NaN gradients in :meth:`backward`, so it
        takes the same path.

        Returns:
            Gradient norm, whether the step was skipped, and the learning rate it used.

        Raises:
            RuntimeError: when fewer micro batches than ``grad_accum_steps`` were closed.
        """
        if self._micro_done != self.grad_accum_steps:
            raise RuntimeError(
                f"TrainEngine.step: {self._micro_done} of {self.grad_accum_steps} micro batches "
                "were back-propagated with boundary=True; the accumulation is incomplete.")
        lr = float(self._ds.get_lr()[0])
        self._ds.step()
        self._micro_done = 0
        norm = self._ds.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        skipped = not self._ds.was_step_applied()
        return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr)

    def zero_grad(self) -> None:
        """Drop every accumulated gradient; the next backward starts a fresh step."""
        self._ds.zero_grad()
        optimizer = getattr(self._ds, "optimizer", None)
        if optimizer is not None and hasattr(optimizer, "zero_grad"):
            # ZeRO-3 keeps partitioned gradients outside param.grad; its zero_grad resets
            # micro_step_id so the next backward overwrites them instead of adding.
            optimizer.zero_grad()
        self._micro_done = 0
        self._grad_forwards = 0

    def train(self) -> None:
        """Training mode (dropout on)."""
        self._ds.train()

    def eval(self) -> None:
        """Evaluation mode (dropout off)."""
        self._ds.eval()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Write DeepSpeed's checkpoint (model, optimizer and scheduler shards) into ``folder``.

        A collective call: every rank must call it. Models with frozen parameters (LoRA, QLoRA)
        leave the frozen base out, so only adapters and their optimizer state are written.

        DeepSpeed's ZeRO files are cut for this world size W; rank 0 also writes the world-size
        record and, where small enough, a portable copy of the trainable state next to them
        (:mod:`pcc_dist.portable_state`), so that :meth:`load_checkpoint` works on another W.

        Args:
            folder: Target folder (created); the checkpoint manager renames it atomically.
        """
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._ds.save_checkpoint(str(folder), tag=_CHECKPOINT_TAG, save_latest=True,
                                 exclude_frozen_parameters=self._has_frozen)
        self._portable().save(Path(folder))

    def load_checkpoint(self, folder: str | os.PathLike, *, module_only: bool = False) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`.

        Under ZeRO-3 call it on a freshly built engine (DeepSpeed needs unmodified partitions).
        Written on another world size, it is restored from ``portable_state.pt`` (weights,
        Adam moments and step, schedule) or, without one, from DeepSpeed's universal conversion
        of its ZeRO files (made once by rank 0 into ``universal/``; the log names the path).

        Args:
            folder: The folder given to :meth:`save_checkpoint`.
            module_only: Load weights only (start a new stage from the previous stage's
                weights, with a fresh optimizer and schedule).

        Raises:
            FileNotFoundError: when the folder holds no DeepSpeed checkpoint.
            CheckpointError: when it was written on another world size and its universal
                conversion fails (named, with the converter's reason), or its trainable
                tensors have other shapes than this model's (checked before anything loads).
        """
        if not (Path(folder) / _CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"{folder} holds no engine checkpoint (no "
                                    f"{_CHECKPOINT_TAG}/ folder); pass a folder written by "
                                    "TrainEngine.save_checkpoint")
        if self._portable().restore_other_layout(Path(folder), module_only):
            return
        if module_only and self.zero_stage == 3:
            # Each rank reads its own shard, not the whole fp32 model (pcc_dist.stage_memory).
            from pcc_dist.stage_memory import load_zero3_weights

            load_zero3_weights(self._ds, Path(folder), _CHECKPOINT_TAG, self.world_size)
            return
        with weights_only_engine_loads(self._ds.checkpoint_engine):
            load_path, _ = self._ds.load_checkpoint(
                str(folder), tag=_CHECKPOINT_TAG, load_module_strict=not self._has_frozen,
                load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only,
                load_module_only=module_only)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load a checkpoint from {folder}")

    def _portable(self) -> PortableState:
        """The world-size-portable side of this engine's checkpoints."""
        return PortableState(self._ds, self.rank, self.world_size)

    def release(self) -> None:
        """Free the DeepSpeed engine's memory (:func:`pcc_dist.stage_memory.release_engine`);
        the engine cannot be used afterwards."""
        from pcc_dist.stage_memory import release_engine

        release_engine(self)
        self._ds = None

    def gathered_state_dict(self, *, trainable_only: bool | None = None,
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The full state dict on rank 0 (empty dict elsewhere), for export.

        Under ZeRO-3 each parameter is gathered in turn (``deepspeed.zero.GatheredParameters``),
        so peak extra memory is one parameter, not the model. A collective call on every rank.

        Args:
            trainable_only: Only parameters with ``requires_grad`` (LoRA adapters). Default: True
                when the model has frozen parameters, else False.
            dtype: Cast floating tensors to this dtype (e.g. ``torch.bfloat16``).

        Returns:
            ``{state_dict key: CPU tensor}`` on rank 0; ``{}`` on other ranks.
        """
        deepspeed = import_deepspeed()
        if trainable_only is None:
            trainable_only = self._has_frozen
        out: dict[str, torch.Tensor] = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            is_param = isinstance(value, nn.Parameter)
            if trainable_only and not (is_param and value.requires_grad):
                continue
            if is_param and hasattr(value, "ds_id"):
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    tensor = value.detach().to("cpu", copy=True) if self.rank == 0 else None
            else:
                tensor = value.detach().to("cpu", copy=True) if self.rank == 0 else None
            if tensor is not None:
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[key] = tensor
        return out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's full (or adapter-only) state dict gathered from the ZeRO-3 partitions.

        The engine wraps the :class:`~pcc_dist.modeling.Embedder`, whose keys carry a
        ``backbone.`` prefix; the backbone's ``save_pretrained`` expects its own keys. Under ZeRO-3
        the module's own tensors are empty partitions, so a key that does not match is not a
        harmless miss: the saved model would be garbage. A collective call; ranks other than 0
        get ``{}``.
        """
        prefix = "backbone."
        gathered = self.gathered_state_dict()
        stray = [k for k in gathered if not k.startswith(prefix)]
        if stray:
            raise RuntimeError(f"unexpected non-backbone weights in the embedder: {stray[:3]}")
        return {k[len(prefix):]: v for k, v in gathered.items()}


def build_engine(model: nn.Module, cfg: PccConfig, stage: StageSettings,
                 total_steps: int) -> TrainEngine:
    """Wrap ``model`` in DeepSpeed for one training stage.

    Args:
        model: The embedder (full model or with LoRA adapters); frozen parameters are not
            optimised.
        cfg: The run config (``train.deepspeed_config``, ``train.optimizer``, ``model.dtype``).
        stage: ``cfg.stage1`` or ``cfg.stage2`` (batch sizes, lr, weight decay, warmup,
            schedule, grad_clip).
        total_steps: Optimizer steps of the stage (the decay reaches 0 there).

    Returns:
        The engine; the process group is started if needed.

    Raises:
        ConfigError: when the DeepSpeed JSON does not fit the PccConfig.
    """
    from pcc_dist.offload import choose_param_offload, local_gpu_bytes

    info = init_distributed()
    ds_config = resolve_ds_config(cfg, stage, info.world_size)
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    # Offload first: a one-rank run whose parameter offload is dropped needs no ZeRO-3 either.
    ds_config = choose_param_offload(ds_config, n_params, info.world_size, local_gpu_bytes())
    ds_config, stage_reason = single_rank_ds_config(ds_config, info.world_size,
                                                    keep_zero=cfg.train.single_rank_keep_zero)
    ds_config = single_rank_zero3(ds_config, info.world_size)
    if stage_reason is not None:
        logger.info("engine: %s", stage_reason)
    deepspeed = import_deepspeed()
    optimizer = build_optimizer(model, cfg, stage, ds_config)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                              lr_scheduler=lr_scheduler_factory(
                                                  stage, total_steps),
                                              config=ds_config,
                                              dist_init_required=False)
    engine = TrainEngine(ds_engine, ds_config, info)
    if info.is_main:
        logger.info("engine: ZeRO stage %d, W=%d, %d examples per rank, optimizer %s, %s "
                    "schedule over %d steps (warmup %d)", engine.zero_stage, info.world_size,
                    ds_config["train_micro_batch_size_per_gpu"], type(optimizer).__name__,
                    stage.schedule, total_steps, stage.warmup_steps)
    return engine
