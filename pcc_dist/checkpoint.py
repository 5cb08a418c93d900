"""The files of one checkpoint folder: layout, trainer counters, RNG states, integrity checks.

Layout of one stage's checkpoint folder (written by :mod:`pcc_dist.checkpoint_manager`)::

    <stage_dir>/checkpoints/
        step-00000100/              complete checkpoints only (renamed into place)
            engine/                 the engine's own files (model, optimizer, scheduler shards)
            rng_rank0.pt ...        per-rank RNG states (torch CPU, CUDA, Python)
            trainer_state.json      counters, data position, tracking run id
            COMPLETE                written last, before the rename
        .tmp-step-00000200/         a write in progress (or one that died): never resumed from

A complete checkpoint can still be damaged later (a disk that fails, a copy that breaks off, a
hand edit). :func:`find_damage` checks the files a rank will read, cheaply and before anything
is restored; :func:`read_trainer_state` and :func:`read_rng` read this module's own files in
full and name what is wrong (:class:`CheckpointError`). :func:`preflight_output_dir` checks
before training that the run folder can hold checkpoints at all.

The data position is the optimizer step alone: batches are a pure function of the step
(:mod:`pcc_dist.sampling`), so the step after resume gets the batch the interrupted run would
have seen.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pcc_dist.errors import PccError
from pcc_dist.output_paths import probe_writable

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"


class CheckpointError(PccError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the folder and the fix."""


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


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def error_reason(exc: BaseException) -> str:
    """The first line of an exception's message (an OSError's strerror), for one-line errors."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


# The JSON types each TrainerState field may hold, by the words of its annotation (a string such
# as "float | None" under `from __future__ import annotations`); an int is a valid float
# (json.dumps writes 3.0 as 3.0, a hand edit may write 3).
JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                          "None": (type(None),)}


def _wrong_fields(data: dict[str, Any]) -> list[str]:
    """The entries of a saved trainer state that :class:`TrainerState` cannot take as they are."""
    known = {f.name: f for f in fields(TrainerState)}
    wrong = [f"unknown field {key!r}" for key in data if key not in known]
    wrong += [f"no {name!r}" for name, f in known.items() if name not in data
              and f.default is MISSING and f.default_factory is MISSING]
    for key, value in data.items():
        words = [w.strip() for w in str(known[key].type).split("|")] if key in known else []
        if not words or not all(w in JSON_TYPES for w in words):
            continue  # unknown (reported above), or a type this check does not cover
        allowed = tuple(t for w in words for t in JSON_TYPES[w])
        # bool is an int to isinstance; a counter that reads true is still damage.
        if isinstance(value, bool) or not isinstance(value, allowed):
            wrong.append(f"{key}={value!r}")
    if isinstance(data.get("step"), int) and data["step"] < 0:
        wrong.append(f"step={data['step']}")
    return wrong


def read_trainer_state(folder: Path) -> TrainerState:
    """The counters saved in checkpoint ``folder``, checked field by field.

    Raises:
        CheckpointError: ``trainer_state.json`` is missing, unreadable, not JSON, or not the
            fields of :class:`TrainerState` with their types (the message starts with its name).
    """
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{STATE_FILE} cannot be read ({error_reason(exc)})") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{STATE_FILE} is not valid JSON ({error_reason(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{STATE_FILE} holds a JSON {type(data).__name__}, not the "
                              "trainer's counters")
    wrong = _wrong_fields(data)
    if wrong:
        raise CheckpointError(f"{STATE_FILE} is not a trainer state ({', '.join(wrong)})")
    return TrainerState(**data)


def read_rng(file: Path) -> dict[str, Any]:
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
                              f"({type(exc).__name__}: {error_reason(exc)})") from exc
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
        return f"is not a complete torch file ({error_reason(exc)})"


def _json_file_problem(file: Path) -> str | None:
    """Why ``file`` is not valid JSON, or None."""
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"is not valid JSON ({error_reason(exc)})"
    return None


# Files checked by their format alone (the engine's own files); this module's own files are
# read in full by read_trainer_state and read_rng.
_FORMAT_CHECKS: dict[str, Callable[[Path], str | None]] = {".pt": _torch_file_problem,
                                                           ".json": _json_file_problem}


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


def find_damage(path: Path, rank: int) -> list[str]:
    """What is wrong with checkpoint ``path`` as this rank would read it; empty if intact.

    Cheap, and before anything is restored: the trainer state parses into its fields and
    types, this rank's RNG file loads into the generators, every other ``*.pt`` file is a
    complete zip archive (see :func:`_torch_file_problem`) and every other ``*.json`` file
    parses. A damaged file that this rank would not read (another rank's RNG file, the
    portable copy on an unchanged world size) still counts: a checkpoint is used whole.

    Args:
        path: A complete checkpoint folder.
        rank: The rank that would read it (which RNG file is its own).

    Returns:
        One line per damaged or missing file, naming it relative to ``path``.
    """
    own_rng = path / rng_name(rank)
    problems = [] if (path / ENGINE_DIR).is_dir() else [f"{ENGINE_DIR}/ is missing"]
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        check = _FORMAT_CHECKS.get(file.suffix)
        if check is None or file in (path / STATE_FILE, own_rng):
            continue  # not a format we check, or read in full below
        problem = check(file)
        if problem is not None:
            problems.append(f"{file.relative_to(path)} {problem}")
    readers = [lambda: read_trainer_state(path)]
    if own_rng.is_file():  # absent when resuming on more ranks than wrote it
        readers.append(lambda: read_rng(own_rng))
    for read in readers:
        try:
            read()
        except CheckpointError as exc:
            problems.append(str(exc))
    return problems
