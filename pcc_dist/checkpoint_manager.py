"""Writing, rotating, choosing and restoring the checkpoints of one training stage.

A checkpoint is written into a temporary folder by every rank, then rank 0 writes the marker and
renames the folder. ``rename`` of a folder is atomic on POSIX, so a reader sees either no
``step-…`` folder or a complete one; a crash mid-write leaves only a ``.tmp-`` folder, which the
next run deletes. Deleting is the same protocol backwards: a checkpoint that is replaced or pruned
is first renamed to a ``.tmp-`` name (atomic) and only then removed file by file, so a crash in
the middle of a removal never leaves a ``step-…`` folder with its marker but without its files.
The folder must be on a file system every rank sees (as DeepSpeed's own checkpointing also
assumes). The folder layout and the files' checks are :mod:`pcc_dist.checkpoint`.

A write that fails (disk full, quota, permissions) raises :class:`CheckpointError` naming the
folder and the previous complete checkpoint, which is untouched: nothing older is pruned before
the new one is complete. The partial ``.tmp-`` folder is removed at once to give the space back.

Before resuming, every rank checks the files it will read
(:func:`pcc_dist.checkpoint.find_damage`), and all ranks agree on the newest checkpoint that no
rank found damaged (:meth:`CheckpointManager.latest_intact`); a damaged one is skipped with a
warning naming the file and renamed to ``damaged-step-…``, where it is kept but never resumed
from or pruned.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch

from pcc_dist.checkpoint import (
    COMPLETE_MARKER,
    ENGINE_DIR,
    STATE_FILE,
    CheckpointError,
    TrainerState,
    capture_rng,
    error_reason,
    find_damage,
    read_rng,
    read_trainer_state,
    restore_rng,
    rng_name,
)
from pcc_dist.distributed import any_rank

logger = logging.getLogger(__name__)

# Folder names: step-NNNNNNNN for a complete checkpoint, .tmp-… for a write in progress.
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
# Damaged checkpoints skipped on resume are renamed to this prefix: kept for inspection, but
# neither resumed from nor pruned.
_DAMAGED_PREFIX = "damaged-"


class SavesCheckpoints(Protocol):
    """What the checkpoint manager needs from the training engine."""

    def save_checkpoint(self, folder: Path) -> None: ...

    def load_checkpoint(self, folder: Path) -> None: ...


def step_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step ``step``: ``step-00000100``."""
    return f"{STEP_PREFIX}{step:08d}"


def fsync_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk before returning."""
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


def discard(path: Path) -> None:
    """Remove a checkpoint folder so that no crash can leave it looking complete: rename it to a
    ``.tmp-`` name first (atomic; :meth:`CheckpointManager.remove_incomplete` deletes such
    leftovers), then delete the files."""
    trash = path.with_name(f"{TMP_PREFIX}discard-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _free_mib(folder: Path) -> str:
    """Free space on ``folder``'s file system in MiB, as text ("?" when it cannot be read)."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f}"
    except OSError:
        return "?"


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
                 if p.name.startswith(STEP_PREFIX) and (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    def find_damage(self, path: Path) -> list[str]:
        """What is wrong with checkpoint ``path`` as this rank would read it (see
        :func:`pcc_dist.checkpoint.find_damage`); empty if intact."""
        return find_damage(path, self.rank)

    def latest_intact(self) -> Path | None:
        """The newest complete checkpoint that no rank finds damaged, or None if none exists.

        A damaged checkpoint (marker present, but a file truncated or unreadable) is skipped
        with a warning naming the file, and the next older one is tried. A collective call: one
        all-reduce per checkpoint tried makes every rank take the same one; ranks resuming
        from different steps would train on mixed states or wait forever in a collective.

        Raises:
            CheckpointError: complete checkpoints exist but every one is damaged; the message
                names each damaged file and the fix.
        """
        skipped: dict[Path, str] = {}
        for path in reversed(self.complete()):
            problems = self.find_damage(path)
            if not any_rank(bool(problems)):
                if skipped:
                    self._set_aside(list(skipped))
                    logger.warning("resuming from %s, the newest intact checkpoint (skipped "
                                   "damaged %s)", path, ", ".join(p.name for p in skipped))
                return path
            # Ranks share the folder and usually find the same damage; a rank that found none
            # still reports that another one did, so rank 0's log tells the whole story.
            found = "; ".join(problems) or "another rank found a damaged file (see its log)"
            if problems or self.rank == 0:
                logger.warning("checkpoint %s is damaged and is not resumed from: %s", path,
                               found)
            skipped[path] = found
        if skipped:
            listed = " | ".join(f"{path.name}: {found}" for path, found in skipped.items())
            raise CheckpointError(
                f"no intact checkpoint to resume from in {self.folder}: {listed}. Delete the "
                f"damaged {STEP_PREFIX}... folders to train this stage from its start, or start a "
                "new run in another run.output_dir.")
        return None

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename damaged checkpoints to ``damaged-step-…`` (rank 0; a collective call).

        Left in place they would still count as the newest complete checkpoints, and pruning
        after the next save would delete the intact ones instead. Kept, not deleted: they are
        evidence of what went wrong, and whoever runs the job decides when they go.
        """
        if self.rank == 0:
            for path in damaged:
                target = path.with_name(_DAMAGED_PREFIX + path.name)
                tries = 1
                while target.exists():  # damaged at this step before: keep both
                    target = path.with_name(f"{_DAMAGED_PREFIX}{path.name}.{tries}")
                    tries += 1
                try:
                    os.replace(path, target)
                except OSError as exc:
                    raise CheckpointError(
                        f"checkpoint {path} is damaged and could not be renamed to "
                        f"{target.name} ({error_reason(exc)}); delete or move it, then run "
                        "again.") from exc
                logger.warning("moved damaged checkpoint %s to %s (kept for inspection; "
                               "delete it when done)", path, target)
        self.barrier()

    def remove_incomplete(self) -> None:
        """Delete leftovers of writes that died (rank 0), so nothing half-written lingers."""
        if self.rank == 0 and self.folder.is_dir():
            for path in self.folder.iterdir():
                unfinished = (path.name.startswith(STEP_PREFIX)
                              and not (path / COMPLETE_MARKER).exists())
                if path.name.startswith(TMP_PREFIX) or unfinished:
                    logger.warning("removing incomplete checkpoint %s (a write that did not "
                                   "finish)", path)
                    shutil.rmtree(path, ignore_errors=True)
        self.barrier()

    def save(self, engine: SavesCheckpoints, state: TrainerState) -> Path:
        """Write a checkpoint of ``state.step`` atomically; a collective call on every rank."""
        final = self.folder / step_name(state.step)
        tmp = self.folder / f"{TMP_PREFIX}{final.name}"
        previous = self.latest()
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            engine.save_checkpoint(tmp / ENGINE_DIR)
            torch.save(capture_rng(), tmp / rng_name(self.rank))
            self.barrier()
            if self.rank == 0:
                fsync_write(tmp / STATE_FILE, json.dumps(asdict(state), indent=2))
                # The marker last: a process that dies before it leaves a folder no reader
                # trusts. (Only the state and the marker are fsynced: this guards against a
                # crashed process, not against losing power.)
                fsync_write(tmp / COMPLETE_MARKER, "")
                if final.exists():  # a step saved twice: replaced, never merged
                    discard(final)
                os.replace(tmp, final)
                _fsync_dir(self.folder)
        except (OSError, RuntimeError) as exc:
            # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
            # pos ..."), not as OSError(ENOSPC): the free space is named to make that plain.
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            reason = error_reason(exc)
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
                discard(old)
            except OSError as exc:
                logger.warning("could not delete old checkpoint %s (%s); it stays on disk",
                               old, exc.strerror or exc)

    def load(self, engine: SavesCheckpoints, path: Path) -> TrainerState:
        """Restore engine, this rank's RNG and the trainer counters from ``path``.

        The counters and RNG states are read and checked before the engine loads, so a damaged
        one stops the load before any state is restored.

        Raises:
            CheckpointError: ``path`` is not complete, one of its files is damaged, or the
                engine cannot load its state.
        """
        if not (path / COMPLETE_MARKER).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} "
                                  "marker); resume from an earlier one.")
        rng_file = path / rng_name(self.rank)
        try:
            state = read_trainer_state(path)
            rng = read_rng(rng_file) if rng_file.is_file() else None
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path} is damaged: {exc}; delete it to resume "
                                  "from an earlier one.") from exc
        _load_engine(engine, path)
        if rng is not None:
            restore_rng(rng)
        else:
            logger.warning("%s has no RNG state for rank %d (saved with world size %d); dropout "
                           "masks after resume will differ from an uninterrupted run", path,
                           self.rank, state.world_size)
        logger.info("resumed from %s at step %d", path, state.step)
        return state


def load_weights_from(engine: SavesCheckpoints, path: Path) -> None:
    """Load only the model weights of checkpoint ``path`` (stage 2 starting from stage 1's final
    checkpoint), with the same integrity checks and error as a resume.

    Raises:
        CheckpointError: a file of the checkpoint is damaged, or its engine state cannot be
            loaded; the message names the checkpoint and the fix.
    """
    problems = CheckpointManager(path.parent, 1, 0, lambda: None).find_damage(path)
    if problems:
        raise CheckpointError(f"checkpoint {path}, which this stage starts from, is damaged: "
                              f"{'; '.join(problems)}; run the earlier stage again, or delete "
                              "the damaged checkpoint to start from the one before it.")
    _load_engine(engine, path, module_only=True)


def _load_engine(engine: SavesCheckpoints, path: Path, module_only: bool = False) -> None:
    """``engine.load_checkpoint`` on the checkpoint's engine folder; what still goes wrong there
    (damage the cheap checks cannot see, such as a flipped bit inside a tensor) becomes a
    :class:`CheckpointError` naming the checkpoint and the fix, not a traceback."""
    try:
        if module_only:
            engine.load_checkpoint(path / ENGINE_DIR, module_only=True)
        else:
            engine.load_checkpoint(path / ENGINE_DIR)
    except CheckpointError:
        raise
    # What torch.load and DeepSpeed raise on contents they cannot use (DeepSpeed checks its
    # files with assert).
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError,
            pickle.UnpicklingError) as exc:
        logger.debug("loading %s failed", path, exc_info=True)
        raise CheckpointError(
            f"checkpoint {path} passed the integrity checks but its engine state could not be "
            f"loaded ({type(exc).__name__}: {error_reason(exc)}); delete it to resume from the one "
            "before it, or start a new run in another run.output_dir.") from exc
