"""Checkpoint files read as data, never as code: ``torch.load(weights_only=True)`` with the few
DeepSpeed classes its files hold allowed.

DeepSpeed unpickles its checkpoint files with ``weights_only=False``, so resuming from (or
converting) a folder someone else wrote could run code hidden in it. Every path that reads
DeepSpeed's files (resume, the stage-2 warm start, the universal-checkpoint conversion) goes
through this one allow-list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def deepspeed_checkpoint_classes() -> list[type]:
    """The DeepSpeed classes a checkpoint file may hold besides tensors and containers: the ZeRO
    stage enum, the loss scalers, and ZeRO-1/2's ``fragment_address`` (two ints per parameter in
    their parameter-slice map)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def weights_only_load(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of one checkpoint file as data only (``mmap``: tensors read when touched)."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


@contextlib.contextmanager
def weights_only_engine_loads(checkpoint_engine: Any, *, mmap: bool = False) -> Iterator[None]:
    """Make a DeepSpeed checkpoint engine read its files with :func:`weights_only_load`."""

    def load(path: str, map_location: Any = None) -> Any:
        return weights_only_load(path, map_location=map_location, mmap=mmap)

    checkpoint_engine.load = load  # instance attribute shadows the class method
    try:
        yield
    finally:
        del checkpoint_engine.load
