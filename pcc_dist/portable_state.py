"""The world-size-portable side of an engine checkpoint (reaches into DeepSpeed's ZeRO state).

DeepSpeed's ZeRO files are cut for the world size W and ZeRO stage that wrote them and cannot be
loaded on another. So next to them rank 0 writes ``world.json`` (W, the stage, and the full shape
of every trainable tensor, compared before anything loads) and, when the trainable state is at
most :data:`PORTABLE_MAX_NUMEL` elements (LoRA adapters, small models), ``portable_state.pt``:
every trainable parameter in fp32 (the optimizer's master copy), its Adam moments, the Adam step
and the schedule, gathered whole from the partitions. On another W or stage the engine is
restored from that copy; with the same layout it loads DeepSpeed's own files (bit-exact). A
full-parameter 7B state (~84 GB with moments) is too large to gather on one rank and gets no
portable copy: on another W it is converted to DeepSpeed's universal format instead
(:mod:`pcc_dist.universal_checkpoint`). Without ZeRO (stage 0) DeepSpeed's own files load on any
W and no copy is needed.

The portable copy stays although the universal conversion of a LoRA (and QLoRA, frozen NF4 base
left out) checkpoint holds exactly its tensors (tests/reliability/test_resume_world_size.py): it
loads with no conversion pass over every shard and no second copy of the state written into the
checkpoint.

:class:`PortableState` works on one ``deepspeed.DeepSpeedEngine``; :class:`pcc_dist.engine.
TrainEngine` calls it from ``save_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcc_dist import universal_checkpoint
from pcc_dist.checkpoint import CheckpointError
from pcc_dist.distributed import import_deepspeed
from pcc_dist.optim import param_shape
from pcc_dist.single_rank import other_layout

logger = logging.getLogger(__name__)

# Written by rank 0 next to DeepSpeed's files (see the module docstring).
WORLD_FILE = "world.json"
PORTABLE_FILE = "portable_state.pt"
# Largest trainable state (elements) that gets a portable copy: 2**28 fp32 elements are 1 GiB of
# weights + 2 GiB of Adam moments gathered on rank 0, which covers LoRA r = 64 on a 7B model
# (~170M elements); a full-parameter 7B run (7e9) would need 84 GB on one rank, so it gets none.
PORTABLE_MAX_NUMEL = 2**28
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


class PortableState:
    """Writes and restores the world-size-free state of one DeepSpeed engine.

    Args:
        ds_engine: The ``deepspeed.DeepSpeedEngine``.
        rank: This rank.
        world_size: W.
    """

    def __init__(self, ds_engine: Any, rank: int, world_size: int):
        self._ds = ds_engine
        self.rank = rank
        self.world_size = world_size
        self.zero_stage = int(ds_engine.zero_optimization_stage())

    def save(self, folder: Path) -> None:
        """Write ``world.json`` and, where small enough, ``portable_state.pt`` into ``folder``
        (rank 0 writes; a collective call, every rank gathers)."""
        numel = sum(int(getattr(p, "ds_numel", p.numel())) for _, p in self.trainable())
        portable = (self._gather()
                    if self.partitioned() and numel <= PORTABLE_MAX_NUMEL else None)
        if self.rank == 0:
            if portable is not None:
                torch.save(portable, folder / PORTABLE_FILE)
            (folder / WORLD_FILE).write_text(json.dumps(
                {"world_size": self.world_size, "portable": portable is not None,
                 "zero_stage": self.zero_stage, "shapes": self.shapes()}))

    def restore_other_layout(self, folder: Path, module_only: bool) -> bool:
        """Check ``world.json`` against this model and, when DeepSpeed's files were cut for
        another world size or ZeRO stage, restore from the portable copy (or the universal
        conversion).

        Returns:
            True when the state was restored here; False when DeepSpeed's own files fit and the
            caller loads them.

        Raises:
            CheckpointError: the trainable tensors have other shapes than this model's (checked
                before anything loads), the portable copy is damaged, or the universal
                conversion fails.
        """
        saved = read_world_file(folder / WORLD_FILE)
        saved_world = saved.get("world_size") if saved is not None else None
        if saved is not None and "shapes" in saved:  # older checkpoints did not record them
            check_same_shapes(folder, saved["shapes"], self.shapes())
        if self.partitioned() and other_layout(saved, self.world_size, self.zero_stage):
            self._load(folder, saved_world, module_only)
            return True
        return False

    def partitioned(self) -> bool:
        """ZeRO stage >= 1: the optimizer state (and at stage 3 the weights) is cut per rank.

        Without ZeRO (stage 0) DeepSpeed saves whole tensors and a plain torch optimizer, which
        load on any world size and have no partitions to gather.
        """
        return self._ds.zero_optimization_stage() > 0

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter with ``requires_grad``, in module order (the
        order every rank gathers them in)."""
        return [(n, p) for n, p in self._ds.module.named_parameters() if p.requires_grad]

    def shapes(self) -> dict[str, list[int]]:
        """Full shape of every trainable tensor (not of this rank's partition), by name."""
        return {name: list(param_shape(param)) for name, param in self.trainable()}

    def _master_partitions(self) -> list[torch.Tensor]:
        """The flat fp32 tensors the wrapped torch optimizer steps (its state is keyed by them)."""
        opt = self._ds.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            flats = getattr(opt, attr, None)
            if flats:
                return list(flats)
        raise RuntimeError(f"portable checkpoints support ZeRO-1/2/3 optimizers; got "
                           f"{type(opt).__name__}")

    def _gather(self) -> dict[str, Any] | None:
        """Trainable weights, Adam moments, Adam step and schedule, whole (collective; rank 0)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner = self._ds.optimizer.optimizer
        flats = self._master_partitions()
        has_moments = all("exp_avg" in inner.state.get(f, {}) for f in flats)
        if has_moments:
            link_state_fragments(self._ds)
        out: dict[str, Any] = {"format": 1, "world_size": self.world_size, "params": {},
                               **{key: {} for key in _ADAM_MOMENTS}}
        for name, param in self.trainable():
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

    def _load(self, folder: Path, saved_world: int, module_only: bool) -> None:
        path = folder / PORTABLE_FILE
        if path.is_file():
            # weights_only: a checkpoint is data, never code to execute.
            data = torch.load(path, map_location="cpu", weights_only=True)
            source = "its portable copy"
        else:  # too large for a portable copy (full-parameter): DeepSpeed's universal format
            data = self._universal_state(folder)
            path, source = folder / universal_checkpoint.UNIVERSAL_DIR, "a universal checkpoint"
        trainable = self.trainable()
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
        shapes = {name: param_shape(param) for name, param in self.trainable()}
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
        link_state_fragments(self._ds)

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


def link_state_fragments(ds_engine: Any) -> None:
    """Point every parameter's ZeRO-1/2 optimizer-state fragments at the current state.

    ``safe_get/set_full_optimizer_state`` read and write through per-parameter views of
    Adam's flat state, which DeepSpeed 0.19.8 links once, right after the first group's
    first step: a fresh engine has none (so a portable load could not write the moments),
    and with two parameter groups (decay / no decay) the second group's state does not
    exist yet then, so its parameters never get views ("exp_avg not found in optimizer state
    fragment" on save with a full-parameter model at ZeRO-1). Re-linking when the
    state exists fixes both. No-op under ZeRO-3, which has no such views.
    """
    link = getattr(ds_engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        ds_engine.optimizer._hp_optimizer_states_linked = False
        link()


def read_world_file(world_file: Path) -> dict[str, Any] | None:
    """A checkpoint's ``world.json``: ``world_size`` (an int) and, since shapes are recorded,
    ``shapes`` (tensor name -> list of ints). None for older checkpoints without the file: they
    are loaded as written on this world size.

    Raises:
        CheckpointError: the file exists but is not ``{"world_size": <int>, ...}`` with, if
            present, a ``shapes`` object of integer lists.
    """
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


def check_same_shapes(folder: Path, saved: dict[str, list[int]],
                       current: dict[str, list[int]]) -> None:
    """Fail before anything loads when a checkpoint's trainable tensors are not this model's.

    Another ``model.lora.r``, ``model.lora.target_modules``, ``model.mode`` or base model would
    otherwise stop inside DeepSpeed with a size-mismatch traceback, or (through the portable
    copy) with some state already restored.

    Raises:
        CheckpointError: naming the first differing tensor, its saved and configured shapes,
            the setting that most likely changed, and the fix.
    """
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
