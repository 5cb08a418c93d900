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

A complete checkpoint can still be damaged later (a disk that fails, a copy that breaks off, a
hand edit). Before resuming, every rank checks the files it will read, cheaply and before
anything is restored (:meth:`CheckpointManager.find_damage`), and all ranks agree on the newest
checkpoint that no rank found damaged (:meth:`CheckpointManager.latest_intact`); a damaged one is
skipped with a warning naming the file and renamed to ``damaged-step-…``, where it is kept but
never resumed from or pruned.

The data position is the optimizer step alone: batches are a pure function of the step
(:mod:`pcc_dist.sampling`), so the step after resume gets the batch the interrupted run would
have seen.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from pcc_dist.distributed import any_rank
from pcc_dist.errors import PccError
from pcc_dist.output_paths import probe_writable

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"
# Damaged checkpoints skipped on resume are renamed to this prefix: kept for inspection, but
# neither resumed from nor pruned.
_DAMAGED_PREFIX = "damaged-"


class CheckpointError(PccError, RuntimeError):
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
    """Restore what :func:`capture_rng` saved; the CUDA part as far as this node's GPUs allow."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        _restore_cuda_rng(list(state["cuda"]))


def _restore_cuda_rng(saved: list[torch.Tensor]) -> None:
    """One saved state per GPU the writer saw, onto the GPUs visible now, by index.

    A node may see fewer GPUs than the writer (another CUDA_VISIBLE_DEVICES, a smaller node):
    ``torch.cuda.set_rng_state_all`` would raise IndexError there. Each rank uses only its own
    device (``LOCAL_RANK``), so the states of devices that are not visible are never drawn from;
    they are dropped with a warning. Visible devices beyond the saved ones keep their seeds.
    """
    visible = torch.cuda.device_count()
    for index, state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(state, index)
    if len(saved) != visible:
        logger.warning("RNG restore: the checkpoint holds CUDA RNG states of %d GPUs and %d are "
                       "visible; restored %d, %s", len(saved), visible, min(len(saved), visible),
                       "the others' states are dropped (no rank here draws from them)"
                       if len(saved) > visible else "the others keep their seeded state")


def _rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (an OSError's strerror), for one-line errors."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


# The JSON types each TrainerState field may hold, by the words of its annotation (a string such
# as "float | None" under `from __future__ import annotations`); an int is a valid float
# (json.dumps writes 3.0 as 3.0, a hand edit may write 3).
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                           "None": (type(None),)}


def _wrong_fields(data: dict[str, Any]) -> list[str]:
    """The entries of a saved trainer state that :class:`TrainerState` cannot take as they are."""
    known = {f.name: f for f in fields(TrainerState)}
    wrong = [f"unknown field {key!r}" for key in data if key not in known]
    wrong += [f"no {name!r}" for name, f in known.items() if name not in data
              and f.default is MISSING and f.default_factory is MISSING]
    for key, value in data.items():
        words = [w.strip() for w in str(known[key].type).split("|")] if key in known else []
        if not words or not all(w in _JSON_TYPES for w in words):
            continue  # unknown (reported above), or a type this check does not cover
        allowed = tuple(t for w in words for t in _JSON_TYPES[w])
        # bool is an int to isinstance; a counter that reads true is still damage.
        if isinstance(value, bool) or not isinstance(value, allowed):
            wrong.append(f"{key}={value!r}")
    if isinstance(data.get("step"), int) and data["step"] < 0:
        wrong.append(f"step={data['step']}")
    return wrong


def _read_trainer_state(folder: Path) -> TrainerState:
    """The counters saved in checkpoint ``folder``, checked field by field.

    Raises:
        CheckpointError: ``trainer_state.json`` is missing, unreadable, not JSON, or not the
            fields of :class:`TrainerState` with their types (the message starts with its name).
    """
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{STATE_FILE} cannot be read ({_reason(exc)})") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{STATE_FILE} is not valid JSON ({_reason(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{STATE_FILE} holds a JSON {type(data).__name__}, not the "
                              "trainer's counters")
    wrong = _wrong_fields(data)
    if wrong:
        raise CheckpointError(f"{STATE_FILE} is not a trainer state ({', '.join(wrong)})")
    return TrainerState(**data)


def _read_rng(file: Path) -> dict[str, Any]:
    """One rank's RNG states, tried on throwaway generators, so that a state that cannot be
    restored fails here rather than after the engine state has been loaded.

    Raises:
        CheckpointError: the file cannot be loaded or its states do not fit the generators (the
            message starts with its name).
    """
    try:
        # weights_only: a checkpoint is data, never code to execute.
        state = torch.load(file, weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a dict of RNG states")
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(state["python"])
    # What torch.load and the generators raise for truncated, garbled or foreign contents.
    except (OSError, EOFError, RuntimeError, ValueError, TypeError, KeyError,
            pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{file.name} cannot be read as RNG states "
                              f"({type(exc).__name__}: {_reason(exc)})") from exc
    return state


def _torch_file_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete torch file, or None.

    ``torch.save`` writes a zip archive whose directory comes last, so a truncated, emptied or
    overwritten file has none. Only that directory is read, not the tensors: the check costs
    the same for a 10 KB RNG file and a 10 GB optimizer shard (a flipped bit inside a tensor
    goes unnoticed; the engine's own load is the last guard for that).
    """
    try:
        with zipfile.ZipFile(file) as archive:
            if archive.infolist():
                return None
        return "is an empty archive, not a torch file"
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        return f"is not a complete torch file ({_reason(exc)})"


def _json_file_problem(file: Path) -> str | None:
    """Why ``file`` is not valid JSON, or None."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"is not valid JSON ({_reason(exc)})"
    return None


# Files checked by their format alone (the engine's own files); this module's own files are
# read in full by _read_trainer_state and _read_rng.
_FORMAT_CHECKS: dict[str, Callable[[Path], str | None]] = {".pt": _torch_file_problem,
                                                           ".json": _json_file_problem}


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

    def find_damage(self, path: Path) -> list[str]:
        """What is wrong with checkpoint ``path`` as this rank would read it; empty if intact.

        Cheap, and before anything is restored: the trainer state parses into its fields and
        types, this rank's RNG file loads into the generators, every other ``*.pt`` file is a
        complete zip archive (see :func:`_torch_file_problem`) and every other ``*.json`` file
        parses. A damaged file that this rank would not read (another rank's RNG file, the
        portable copy on an unchanged world size) still counts: a checkpoint is used whole.

        Args:
            path: A complete checkpoint folder.

        Returns:
            One line per damaged or missing file, naming it relative to ``path``.
        """
        own_rng = path / _rng_name(self.rank)
        problems = [] if (path / ENGINE_DIR).is_dir() else [f"{ENGINE_DIR}/ is missing"]
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            check = _FORMAT_CHECKS.get(file.suffix)
            if check is None or file in (path / STATE_FILE, own_rng):
                continue  # not a format we check, or read in full below
            problem = check(file)
            if problem is not None:
                problems.append(f"{file.relative_to(path)} {problem}")
        readers = [lambda: _read_trainer_state(path)]
        if own_rng.is_file():  # absent when resuming on more ranks than wrote it
            readers.append(lambda: _read_rng(own_rng))
        for read in readers:
            try:
                read()
            except CheckpointError as exc:
                problems.append(str(exc))
        return problems

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
                f"damaged {_PREFIX}... folders to train this stage from its start, or start a "
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
                        f"{target.name} ({_reason(exc)}); delete or move it, then run "
                        "again.") from exc
                logger.warning("moved damaged checkpoint %s to %s (kept for inspection; "
                               "delete it when done)", path, target)
        self.barrier()

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
            engine.save_checkpoint(tmp / ENGINE_DIR)
            torch.save(capture_rng(), tmp / _rng_name(self.rank))
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
            reason = _reason(exc)
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
        rng_file = path / _rng_name(self.rank)
        try:
            state = _read_trainer_state(path)
            rng = _read_rng(rng_file) if rng_file.is_file() else None
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
            f"loaded ({type(exc).__name__}: {_reason(exc)}); delete it to resume from the one "
            "before it, or start a new run in another run.output_dir.") from exc
