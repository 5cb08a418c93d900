"""Where an export may write, and writing it there all at once.

An export never writes into the folders it reads (the run folder, a LoRA run's base model
folder), into a folder inside them or into one containing them, and never into a training run
folder; a non-empty target needs ``overwrite``. :func:`staged` gives a temporary sibling folder
that is renamed into place only when the export is complete, so a failed export leaves no
half-written target (the rules in full: :mod:`pcc_dist.export`).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcc_dist.modeling import ModelError, is_training_run

logger = logging.getLogger("pcc_dist.export")


class ExportError(ModelError):
    """An export that cannot be written faithfully; the message says why and what to do."""


def folders_read(run: Path, meta: dict[str, Any]) -> list[Path]:
    """The folders an export of ``run`` reads: the run folder and a LoRA run's local base."""
    base = (meta.get("base_model") or {}).get("name_or_path")
    folders = [run]
    if meta["mode"] != "full" and base and Path(base).is_dir():
        folders.append(Path(base))
    return folders


def check_target(out: Path, folders: Sequence[Path], overwrite: bool) -> None:
    """Refuse a target whose writing would destroy files the user still needs.

    Raises:
        ExportError: ``out`` is, contains or lies inside a folder the export reads; it is a
            training run folder; it is a file; or it is a non-empty folder without ``overwrite``.
    """
    target = out.resolve()
    for folder in folders:
        source = folder.resolve()
        if target == source or source in target.parents or target in source.parents:
            where = (
                "is"
                if target == source
                else ("is inside" if source in target.parents else "contains")
            )
            raise ExportError(
                f"target {out} {where} the folder this export reads ({source}); writing there "
                "would overwrite or delete the model being exported. Give a target folder "
                "outside it."
            )
    if is_training_run(target):
        raise ExportError(
            f"target {out} is a training run folder (config.yaml, checkpoints, model/); an "
            "export never replaces one, even with --overwrite. Give a new folder, e.g. "
            f"{target.parent / (target.name + '-export')}."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"target {out} exists and is not a folder; give a new folder path.")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise ExportError(
            f"target {out} is a folder that is not empty; give a new or empty folder, or pass "
            "--overwrite (overwrite=True) to replace it (the old folder stays until the new "
            "export is complete)."
        )


def _sibling(out: Path, tag: str) -> Path:
    """A fresh hidden name next to ``out``: same file system, so renames are atomic."""
    return out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, moved into place when the block succeeds.

    On any failure the sibling is deleted and ``out`` is untouched.

    Raises:
        ExportError: the sibling cannot be created or written (disk full, permissions).
    """
    staging = _sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as exc:
        raise ExportError(
            f"cannot create a folder next to {out} ({exc.strerror or exc}); check that its "
            "parent folder is writable."
        ) from exc
    try:
        yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(
            f"writing the export for {out} failed ({exc.strerror or exc}); {out} is unchanged. "
            "Free space (or fix permissions) and run the export again."
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, out)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished export to ``out``; an existing ``out`` is renamed away first.

    Between the two renames ``out`` is briefly missing, but its old content is never deleted
    before the new one is in place (a crash there leaves it as ``.<name>.old-…``).
    """
    if not out.exists():
        os.replace(staging, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logger.warning("could not delete the replaced export %s; remove it by hand", old)
