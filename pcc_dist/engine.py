"""DeepSpeed training engine: process group, optimizer, schedule, the step and checkpoint API.

This module and :mod:`pcc_dist.ds_config` (the DeepSpeed JSON) are the only ones of pcc_dist that
import DeepSpeed (lazily, inside functions), so that ``import pcc_dist`` and everything above the
engine work with torch alone.

Two pieces:

* :func:`init_distributed` starts (or joins) the process group: ``gloo`` on CPU, ``nccl`` on CUDA,
  under ``torchrun``, the ``deepspeed`` launcher or no launcher at all (a 1-rank group on a free
  port).
* :func:`build_engine` fills the run's DeepSpeed JSON (:func:`pcc_dist.ds_config.resolve_ds_config`)
  and wraps ``deepspeed.initialize`` with a torch AdamW over the trainable parameters, a warmup +
  decay schedule and the non-finite guard, and returns a :class:`TrainEngine`, the small surface
  the trainer, the gradient cache and the checkpoint code use.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcc_dist import universal_checkpoint
from pcc_dist.config import PccConfig, StageSettings
from pcc_dist.distributed import free_port
from pcc_dist.ds_config import import_deepspeed, resolve_ds_config
from pcc_dist.safe_loading import weights_only_engine_loads
from pcc_dist.single_rank import other_layout, single_rank_ds_config

logger = logging.getLogger(__name__)

# DeepSpeed writes <folder>/<tag>/… and <folder>/latest; one fixed tag per folder, because the
# checkpoint manager already names folders by step.
_CHECKPOINT_TAG = "state"
# Written by rank 0 next to DeepSpeed's files: the world size the partitions were cut for and the
# shapes of the trainable tensors they hold, and the world-size-free copy of the trainable state
# (see TrainEngine.save_checkpoint).
_WORLD_FILE = "world.json"
_PORTABLE_FILE = "portable_state.pt"
# Largest trainable state (elements) that gets a portable copy: 2**28 fp32 elements are 1 GiB of
# weights + 2 GiB of Adam moments gathered on rank 0, which covers LoRA r = 64 on a 7B model
# (~170M elements); a full-parameter 7B run (7e9) would need 84 GB on one rank, so it gets none.
PORTABLE_MAX_NUMEL = 2**28
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank in ``[0, world_size)``.
        world_size: Number of ranks W.
        local_rank: Rank on this node (selects the CUDA device).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes shared files."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start the process group, or return the one already running.

    Works under ``torchrun`` and the ``deepspeed`` launcher (both export ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and without a launcher: a plain
    ``python train.py`` gets a 1-rank group on 127.0.0.1 and a free port, because DeepSpeed needs
    an initialised group even for W = 1. Idempotent.

    Returns:
        Rank, world size, local rank and backend of this process.
    """
    import torch.distributed as dist

    deepspeed = import_deepspeed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            # No launcher: a 1-rank group. setdefault keeps a MASTER_ADDR/PORT the user exported.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("LOCAL_RANK", "0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        _init_group_on_a_fresh_store_after_restart(backend)
        # auto_mpi_discovery=False: the env vars above are complete, and MPI discovery would
        # need mpi4py. (With the group already up, DeepSpeed only wraps it.)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    else:
        backend = dist.get_backend()
        # Registers DeepSpeed's communication backend on top of the existing group.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)
    logger.debug("process group: %s", info)
    return info


def _init_group_on_a_fresh_store_after_restart(backend: str) -> None:
    """Start the process group under a key prefix of its own when torchrun restarted the workers.

    ``torchrun --max-restarts N`` with its default static rendezvous keeps ONE TCPStore in the
    agent for the whole job, and the workers' ``env://`` init adds no per-attempt prefix (torch
    2.13 assumes a new store per attempt). The restarted group then reads the addresses that the
    dead attempt's ranks published and gloo fails with "connectFullMesh failed ... Connection
    refused" (measured here), so a restart could never resume. Prefixing the store with
    ``TORCHELASTIC_RESTART_COUNT`` gives every attempt clean keys. A no-op outside a torchrun
    agent store, and on the first attempt, whose keys are clean anyway.
    """
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout as timeout

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or attempt == "0":
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pcc_attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    logger.info("torchrun restart %s: process group started on fresh store keys", attempt)


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


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


def _param_shape(param: nn.Parameter) -> torch.Size:
    # Under deepspeed.zero.Init the local tensor is an empty partition; ds_shape is the real one.
    return getattr(param, "ds_shape", param.shape)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if len(_param_shape(param)) >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameter (requires_grad=True); for LoRA "
                         "check model.lora.target_modules")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _build_optimizer(model: nn.Module, cfg: PccConfig, stage: StageSettings,
                     ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    from pcc_dist.offload import use_deepspeed_cpu_adam

    groups = _param_groups(model, stage.weight_decay)
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


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


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

        DeepSpeed's ZeRO files are cut for this world size W and cannot be loaded on another one.
        So rank 0 also writes ``world.json`` (W, and the shape of every trainable tensor, which
        :meth:`load_checkpoint` compares before loading) and, when the trainable state is at most
        :data:`PORTABLE_MAX_NUMEL` elements (LoRA adapters, small models),
        ``portable_state.pt``: every trainable parameter in fp32 (the optimizer's master copy),
        its Adam moments, the Adam step and the schedule, gathered whole from the partitions.
        :meth:`load_checkpoint` uses it when the world size changed; with the same W it loads
        DeepSpeed's own files (bit-exact). A full-parameter 7B state (~84 GB with moments) is
        too large to gather on one rank and gets no portable copy: on another W it is converted
        to DeepSpeed's universal format instead (:mod:`pcc_dist.universal_checkpoint`). Without
        ZeRO (stage 0) DeepSpeed's own files load on any W and no copy is needed.

        The portable copy stays although the universal conversion of a LoRA (and QLoRA, frozen
        NF4 base left out) checkpoint holds exactly its tensors
        (tests/reliability/test_resume_world_size.py): it loads with no conversion pass over
        every shard and no second copy of the state written into the checkpoint.

        Args:
            folder: Target folder (created); the checkpoint manager renames it atomically.
        """
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._ds.save_checkpoint(str(folder), tag=_CHECKPOINT_TAG, save_latest=True,
                                 exclude_frozen_parameters=self._has_frozen)
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for _, p in self._trainable())
        portable = (self._portable_state()
                    if self._partitioned() and numel <= PORTABLE_MAX_NUMEL else None)
        if self.rank == 0:
            if portable is not None:
                torch.save(portable, Path(folder) / _PORTABLE_FILE)
            (Path(folder) / _WORLD_FILE).write_text(json.dumps(
                {"world_size": self.world_size, "portable": portable is not None,
                 "zero_stage": self.zero_stage, "shapes": self._trainable_shapes()}))

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
        saved = _read_world_file(Path(folder) / _WORLD_FILE)
        saved_world = saved.get("world_size") if saved is not None else None
        if saved is not None and "shapes" in saved:  # older checkpoints did not record them
            _check_same_shapes(Path(folder), saved["shapes"], self._trainable_shapes())
        if self._partitioned() and other_layout(saved, self.world_size, self.zero_stage):
            self._load_portable(Path(folder), saved_world, module_only)
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

    # -- world-size-free state ---------------------------------------------------------------

    def _partitioned(self) -> bool:
        """ZeRO stage >= 1: the optimizer state (and at stage 3 the weights) is cut per rank.

        Without ZeRO (stage 0) DeepSpeed saves whole tensors and a plain torch optimizer, which
        load on any world size and have no partitions to gather.
        """
        return self._ds.zero_optimization_stage() > 0

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _trainable_shapes(self) -> dict[str, list[int]]:
        """Full shape of every trainable tensor (not of this rank's partition), by name."""
        return {name: list(_param_shape(param)) for name, param in self._trainable()}

    def _master_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 tensors the wrapped torch optimizer steps (its state is keyed by them)."""
        opt = self._ds.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            flats = getattr(opt, attr, None)
            if flats:
                return list(flats)
        raise RuntimeError(f"portable checkpoints support ZeRO-1/2/3 optimizers; got "
                           f"{type(opt).__name__}")

    def _portable_state(self) -> dict[str, Any] | None:
        """Trainable weights, Adam moments, Adam step and schedule, whole (collective; rank 0)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = self._ds.optimizer.optimizer
        flats = self._master_partitions()
        has_moments = all("exp_avg" in inner.state.get(f, {}) for f in flats)
        if has_moments:
            self._link_state_fragments()
        out: dict[str, Any] = {"format": 1, "world_size": self.world_size, "params": {},
                               **{key: {} for key in _ADAM_MOMENTS}}
        for name, param in self._trainable():
            # Each call all-gathers one tensor's partitions: every rank, same order.
            value = safe_get_full_fp32_param(param)
            moments = {key: safe_get_full_optimizer_state(param, key) if has_moments else None
                       for key in _ADAM_MOMENTS}
            if self.rank == 0:
                out["params"][name] = value.detach().to("cpu", torch.float32, copy=True)
                for key, moment in moments.items():
                    if moment is not None:
                        out[key][name] = moment.detach().to("cpu", torch.float32, copy=True)
        if self.rank != 0:
            return None
        # Every sub-group steps together (a skipped step skips them all), so one count serves.
        steps = {float(inner.state[f]["step"]) for f in flats if "step" in inner.state.get(f, {})}
        out["adam_step"] = max(steps) if steps else 0.0
        scheduler = self._ds.lr_scheduler
        out["lr_scheduler"] = scheduler.state_dict() if scheduler is not None else None
        return out

    def _load_portable(self, folder: Path, saved_world: int, module_only: bool) -> None:
        from pcc_dist.checkpoint import CheckpointError

        path = folder / _PORTABLE_FILE
        if path.is_file():
            # weights_only: a checkpoint is data, never code to execute.
            data = torch.load(path, map_location="cpu", weights_only=True)
            source = "its portable copy"
        else:  # too large for a portable copy (full-parameter): DeepSpeed's universal format
            data = self._universal_state(folder)
            path, source = folder / universal_checkpoint.UNIVERSAL_DIR, "a universal checkpoint"
        trainable = self._trainable()
        names = {n for n, _ in trainable}
        if names != set(data["params"]):
            raise CheckpointError(
                f"{path} holds other trainable tensors than this model (e.g. "
                f"{sorted(names ^ set(data['params']))[:3]}); resume with the same model.mode "
                "and LoRA settings.")
        moment_counts = {len(data[k]) for k in _ADAM_MOMENTS}
        # All tensors have moments, or none do because Adam had not stepped yet (every step so
        # far skipped); anything else is a damaged file, and resuming with fresh moments would
        # silently change the trajectory.
        if moment_counts not in ({len(names)}, {0}) or (moment_counts == {0}
                                                         and data["adam_step"] > 0):
            raise CheckpointError(
                f"{path} holds Adam moments for {sorted(moment_counts)} of {len(names)} "
                f"trainable tensors after {data['adam_step']:g} Adam steps: the file is "
                "damaged; resume from an earlier checkpoint.")
        restore_moments = not module_only and moment_counts == {len(names)}
        if restore_moments:
            self._init_adam_state(data["adam_step"])
        for name, param in trainable:
            value = data["params"][name]
            self._set_full(param, value, None)
            if restore_moments:
                for key in _ADAM_MOMENTS:
                    self._set_full(param, data[key][name], key)
        if not module_only and data.get("lr_scheduler") is not None:
            scheduler = self._ds.lr_scheduler
            scheduler.load_state_dict(data["lr_scheduler"])
            # LambdaLR.load_state_dict restores its counters, not the optimizer's current lr,
            # which DeepSpeed's own optimizer checkpoint would have carried.
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(),
                                 strict=True):
                group["lr"] = lr
        logger.info("loaded %s (written on %d ranks) on %d ranks from %s%s",
                    folder, saved_world, self.world_size, source,
                    "" if restore_moments or module_only else " (Adam had not stepped yet)")

    def _universal_state(self, folder: Path) -> dict[str, Any]:
        """The portable copy's mapping, read from DeepSpeed's universal conversion of the
        checkpoint (made once, by rank 0; see :mod:`pcc_dist.universal_checkpoint`)."""
        shapes = {name: _param_shape(param) for name, param in self._trainable()}
        # A 1-rank run may have no process group; it has nobody to wait for.
        barrier = torch.distributed.barrier if self.world_size > 1 else (lambda: None)
        return universal_checkpoint.universal_state(folder, shapes, rank=self.rank,
                                                    barrier=barrier)

    def _init_adam_state(self, step: float) -> None:
        """Create Adam's state for every master partition (torch creates it lazily on the first
        step, so a fresh engine has none to copy the saved moments into)."""
        inner = self._ds.optimizer.optimizer
        for flat in self._master_partitions():
            state = inner.state[flat]
            # The fused kernel reads ``step`` on the partition's device; the others on the CPU.
            device = flat.device if inner.defaults.get("fused") else torch.device("cpu")
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
            for key in _ADAM_MOMENTS:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        self._link_state_fragments()

    def _link_state_fragments(self) -> None:
        """Point every parameter's ZeRO-1/2 optimizer-state fragments at the current state.

        ``safe_get/set_full_optimizer_state`` read and write through per-parameter views of
        Adam's flat state, which DeepSpeed 0.19.8 links once, right after the first group's
        first step: a fresh engine has none (so a portable load could not write the moments),
        and with two parameter groups (decay / no decay) the second group's state does not
        exist yet then, so its parameters never get views ("exp_avg not found in optimizer state
        fragment" on save, measured with a full-parameter model at ZeRO-1). Re-linking when the
        state exists fixes both. No-op under ZeRO-3, which has no such views.
        """
        link = getattr(self._ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            self._ds.optimizer._hp_optimizer_states_linked = False
            link()

    def _set_full(self, param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
        """Write a whole tensor into this rank's partition of the fp32 master weight (key None)
        or of an Adam moment, and for the weight also into the module's own copy."""
        deepspeed = import_deepspeed()
        opt = self._ds.optimizer
        flat = value.detach().float().flatten()
        if hasattr(param, "ds_id"):
            # ZeRO-3. Not safe_set_full_*: in 0.19.8 it narrows the unpadded value by the padded
            # partition size, which fails on the last rank when W does not divide the numel.
            part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                        optim_state_key=key)
            start = min(part.numel() * opt._get_param_partition_rank(param), flat.numel())
            piece = flat[start:start + part.numel()]
            part.data.zero_()
            part.data[:piece.numel()].copy_(piece.to(part.device, part.dtype))
        else:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            if key is None:
                safe_set_full_fp32_param(param, flat.view(param.shape))
            else:
                safe_set_full_optimizer_state(param, flat.view(param.shape), key)
        if key is None:
            # The module's (possibly lower-precision) copy; modifier_rank=0 re-partitions it.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(flat.view(param.shape).to(param.device, param.dtype))

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


# stage3_param_persistence_threshold that keeps every parameter whole (more elements than any
# model has).
_PERSIST_ALL = 10**15


def _read_world_file(world_file: Path) -> dict[str, Any] | None:
    """A checkpoint's ``world.json``: ``world_size`` (an int) and, since shapes are recorded,
    ``shapes`` (tensor name -> list of ints). None for older checkpoints without the file: they
    are loaded as written on this world size.

    Raises:
        CheckpointError: the file exists but is not ``{"world_size": <int>, ...}`` with, if
            present, a ``shapes`` object of integer lists.
    """
    from pcc_dist.checkpoint import CheckpointError

    if not world_file.is_file():
        return None
    try:
        saved = json.loads(world_file.read_text(encoding="utf-8"))
        saved["world_size"] = int(saved["world_size"])
        if saved.get("zero_stage", 0) not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage is {saved['zero_stage']!r}, not 0-3")
        shapes = saved.get("shapes", {})
        if not isinstance(shapes, dict) or not all(
                isinstance(s, list) and all(isinstance(d, int) for d in s)
                for s in shapes.values()):
            raise TypeError("shapes is not an object of integer lists")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{world_file} is damaged ({exc!r}); resume from an earlier "
                              "checkpoint.") from exc
    return saved


def _lora_rank_change(name: str, saved: list[int], current: list[int]) -> str | None:
    """The saved and configured ``model.lora.r`` when they are all that differs between a LoRA
    tensor's shapes (lora_A is [r, in], lora_B is [out, r]), else None."""
    if ".lora_A." in name and len(saved) == len(current) == 2 and saved[1] == current[1]:
        return f"model.lora.r was {saved[0]} when the checkpoint was written and is {current[0]}"
    if ".lora_B." in name and len(saved) == len(current) == 2 and saved[0] == current[0]:
        return f"model.lora.r was {saved[1]} when the checkpoint was written and is {current[1]}"
    return None


def _check_same_shapes(folder: Path, saved: dict[str, list[int]],
                       current: dict[str, list[int]]) -> None:
    """Fail before anything loads when a checkpoint's trainable tensors are not this model's.

    Another ``model.lora.r``, ``model.lora.target_modules``, ``model.mode`` or base model would
    otherwise stop inside DeepSpeed with a size-mismatch traceback, or (through the portable
    copy) with some state already restored.

    Raises:
        CheckpointError: naming the first differing tensor, its saved and configured shapes,
            the setting that most likely changed, and the fix.
    """
    from pcc_dist.checkpoint import CheckpointError

    fix = ("Resume with the settings the run was started with, or start a new run in another "
           "run.output_dir.")
    differing = [n for n in saved if n in current and saved[n] != current[n]]
    if differing:
        name = differing[0]
        setting = (_lora_rank_change(name, saved[name], current[name])
                   or "a setting that shapes it changed (model.name_or_path, model.lora.*)")
        raise CheckpointError(
            f"{folder} does not fit this model: {len(differing)} trainable tensors have other "
            f"shapes, e.g. {name} is {saved[name]} in the checkpoint and {current[name]} with "
            f"this config ({setting}). {fix}")
    missing, extra = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    if missing or extra:
        raise CheckpointError(
            f"{folder} holds other trainable tensors than this model ({len(missing)} only in "
            f"the checkpoint, e.g. {missing[:1]}; {len(extra)} only in this model, e.g. "
            f"{extra[:1]}): model.mode or model.lora.target_modules changed. {fix}")


def _single_rank_zero3(ds_config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """On one rank, keep every ZeRO-3 parameter resident instead of re-gathering it.

    With W = 1 a rank's partition of a parameter is the whole tensor, so ZeRO-3 saves no memory,
    but it still frees each parameter above ``stage3_param_persistence_threshold`` (1e5 elements
    in ds_configs/zero3.json) after use and gathers it again in every forward and backward.
    Measured on all-MiniLM-L6-v2 stage 2, one CPU process, runs alternating, on a 2-core machine
    shared with other jobs (benchmarks/train_throughput.py variant ``zero3_partitioned``):
    1.2-1.4x more pairs/s of wall time with every parameter resident, in three experiments
    (median over runs), at an unchanged process CPU time per step: the release/re-gather path
    waits rather than computes. Raising the threshold leaves the rest of ZeRO-3 as it is
    (partitioned fp32 optimizer step, the global-norm non-finite guard, the multi-backward
    accumulation API, the checkpoint format). Not applied when parameters are offloaded
    (``offload_param``), where resident parameters would defeat the offload.
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
    ds_config = _single_rank_zero3(ds_config, info.world_size)
    if stage_reason is not None:
        logger.info("engine: %s", stage_reason)
    deepspeed = import_deepspeed()
    optimizer = _build_optimizer(model, cfg, stage, ds_config)
    factor = WarmupDecay(stage.warmup_steps, total_steps, stage.schedule)

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                              lr_scheduler=make_scheduler, config=ds_config,
                                              dist_init_required=False)
    engine = TrainEngine(ds_engine, ds_config, info)
    if info.is_main:
        logger.info("engine: ZeRO stage %d, W=%d, %d examples per rank, optimizer %s, %s "
                    "schedule over %d steps (warmup %d)", engine.zero_stage, info.world_size,
                    ds_config["train_micro_batch_size_per_gpu"], type(optimizer).__name__,
                    stage.schedule, total_steps, stage.warmup_steps)
    return engine
