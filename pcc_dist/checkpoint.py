"""Atomic checkpoints and exact resume.

Layout of one stage's checkpoint folder::

    <stage_dir>/checkpoints/
        step-00000100/              complete checkpoints only (renamed into place)
            engine/                 the engine's own files (model, optimizer, scheduler shards)
            rng_rank0.pt ...        per-rank RNG states (torch CPU, CUDA, Python)
            trainer_state.json      counters, data position, tracking run id
            COMPLETE                written last, before the rename
        .tmp-step-00000200/         a write in progress (or one that died): never resumed from

A checkpoint is written into a temporary folder by every rank, then rank 0 writes the marker and
renames the folder. ``rename`` of a folder is atomic on POSIX, so a reader sees either no
``step-…`` folder or a complete one; a crash mid-write leaves only a ``.tmp-`` folder, which the
next run deletes. Deleting is the same protocol backwards: a checkpoint that is replaced or pruned
is first renamed to a ``.tmp-`` name (atomic) and only then removed file by file, so a crash in
the middle of a removal never leaves a ``step-…`` folder with its marker but without its files.
The folder must be on a file system every rank sees (as DeepSpeed's own checkpointing also
assumes).

A write that fails (disk full, quota, permissions) raises :class:`CheckpointError` naming the
folder and the previous complete checkpoint, which is untouched: nothing older is pruned before
the new one is complete. The partial ``.tmp-`` folder is removed at once to give the space back.

The data position is the optimizer step alone: batches are a pure function of the step
(:mod:`pcc_dist.sampling`), so the step after resume gets the batch the interrupted run would
have seen.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pcc_dist.output_paths import probe_writable

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the folder and the fix."""


class SavesCheckpoints(Protocol):
    """What the checkpoint manager needs from the training engine."""

    def save_checkpoint(self, folder: Path) -> None: ...

    def load_checkpoint(self, folder: Path) -> None: ...


@dataclass
class TrainerState:
    """Counters that, with the engine state and RNG, make a resumed run continue exactly."""

    stage: str
    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    last_loss: float | None = None
    best_dev_spearman: float | None = None
    best_step: int | None = None
    tracking_run_id: str | None = None
    world_size: int = 1
    global_batch_size: int = 0
    # Seconds spent in training steps so far, summed over every job that ran some of them.
    train_seconds: float = 0.0


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (numpy's global RNG is not used by pcc_dist)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a checkpoint folder so that no crash can leave it looking complete: rename it to a
    ``.tmp-`` name first (atomic; :meth:`CheckpointManager.remove_incomplete` deletes such
    leftovers), then delete the files."""
    trash = path.with_name(f"{_TMP_PREFIX}discard-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _free_mib(folder: Path) -> str:
    """Free space on ``folder``'s file system in MiB, as text ("?" when it cannot be read)."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f}"
    except OSError:
        return "?"


def preflight_output_dir(folder: Path, min_free_bytes: int = 64 * 2**20, *,
                         create: bool = True) -> None:
    """Fail before training if ``folder`` cannot hold checkpoints.

    Args:
        folder: The run folder (``run.output_dir``).
        min_free_bytes: Free space a checkpoint needs at least.
        create: Make the folder, as a run does. False (``pcc-train --validate``) probes the
            nearest folder on its path that exists instead, and leaves the disk as it was.

    Raises:
        CheckpointError: the folder cannot be created or written, or has less than
            ``min_free_bytes`` free.
    """
    probed = folder
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            probed = next(p for p in (folder.absolute(), *folder.absolute().parents)
                          if p.exists())
        # Every rank probes, on one shared file system across nodes: a unique name each.
        probe_writable(probed)
    except OSError as exc:
        raise CheckpointError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); choose another "
            "run.output_dir or fix its permissions.") from exc
    free = shutil.disk_usage(probed).free
    if free < min_free_bytes:
        raise CheckpointError(
            f"output folder {folder} has {free / 2**20:.0f} MiB free, less than the "
            f"{min_free_bytes / 2**20:.0f} MiB a checkpoint needs; free space or move "
            "run.output_dir.")


class CheckpointManager:
    """Saves, finds, prunes and restores checkpoints of one training stage.

    Args:
        folder: ``<stage_dir>/checkpoints``.
        keep_last: Complete checkpoints to keep; older ones are deleted after a successful save.
        rank: This process's rank.
        barrier: Synchronises all ranks (``torch.distributed.barrier`` or a no-op for W = 1).
    """

    def __init__(self, folder: Path, keep_last: int, rank: int, barrier: Callable[[], None]):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir()
                 if p.name.startswith(_PREFIX) and (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def remove_incomplete(self) -> None:
        """Delete leftovers of writes that died (rank 0), so nothing half-written lingers."""
        if self.rank == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                unfinished = path.name.startswith(_PREFIX) and not (path / COMPLETE_MARKER).exists()
                if path.name.startswith(_TMP_PREFIX) or unfinished:
                    logger.warning("removing incomplete checkpoint %s (a write that did not "
                                   "finish)", path)
                    shutil.rmtree(path, ignore_errors=True)
        self.barrier()

    def save(self, engine: SavesCheckpoints, state: TrainerState) -> Path:
        """Write a checkpoint of ``state.step`` atomically; a collective call on every rank."""
        final = self.folder / _step_name(state.step)
        tmp = self.folder / f"{_TMP_PREFIX}{final.name}"
        previous = self.latest()
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            engine.save_checkpoint(tmp / "engine")
            torch.save(capture_rng(), tmp / f"rng_rank{self.rank}.pt")
            self.barrier()
            if self.rank == 0:
                _fsync_write(tmp / STATE_FILE, json.dumps(asdict(state), indent=2))
                # The marker last: a process that dies before it leaves a folder no reader
                # trusts. (Only the state and the marker are fsynced: this guards against a
                # crashed process, not against losing power.)
                _fsync_write(tmp / COMPLETE_MARKER, "")
                if final.exists():  # a step saved twice: replaced, never merged
                    _discard(final)
                os.replace(tmp, final)
                _fsync_dir(self.folder)
        except (OSError, RuntimeError) as exc:
            # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
            # pos ..."), not as OSError(ENOSPC): the free space is named to make that plain.
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            kept = (f"the previous checkpoint {previous} is intact; free space (or fix the "
                    "folder) and run again to resume from it" if previous is not None else
                    "no earlier checkpoint exists; free space (or fix the folder) and start "
                    "again")
            raise CheckpointError(
                f"writing checkpoint {final.name} into {self.folder} failed ({reason}; "
                f"{_free_mib(self.folder)} MiB free there); {kept}.") from exc
        if self.rank == 0:
            self._prune()
            logger.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints (rank 0). The new
        checkpoint is already in place: a failure here costs disk space, not the run."""
        for old in self.complete()[:-self.keep_last]:
            try:
                _discard(old)
            except OSError as exc:
                logger.warning("could not delete old checkpoint %s (%s); it stays on disk",
                               old, exc.strerror or exc)

    def load(self, engine: SavesCheckpoints, path: Path) -> TrainerState:
        """Restore engine, this rank's RNG and the trainer counters from ``path``."""
        if not (path / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} "
                                  "marker); resume from an earlier one.")
        engine.load_checkpoint(path / "engine")
        state = TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            # weights_only: a checkpoint is data, never code to execute.
            restore_rng(torch.load(rng_file, weights_only=True))
        else:
            logger.warning("%s has no RNG state for rank %d (saved with world size %d); dropout "
                           "masks after resume will differ from an uninterrupted run", path,
                           self.rank, state.world_size)
        logger.info("resumed from %s at step %d", path, state.step)
        return state
