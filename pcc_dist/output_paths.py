"""Checks that an output path can be written, made before the work that fills it.

So a command fails at once on an unwritable path instead of after minutes of evaluation
(``pcc-eval --json``) or training; the run folder of ``pcc-train`` is probed the same way before
any process group starts.
The probe creates and deletes one uniquely named file, so it is safe on a folder shared by
every rank of a job and leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def probe_writable(folder: Path) -> None:
    """Create and delete a uniquely named file in ``folder``.

    Raises:
        OSError: The folder cannot be written (missing, read-only, not a folder, ...).
    """
    fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def output_file_problem(path: str | Path, option: str) -> str | None:
    """Why the file ``path`` could not be written, or None when it can.

    Missing parent folders are fine when the nearest existing one is writable (the writers
    create them); nothing is created here.

    Args:
        path: The output file.
        option: How the user named it (``"--json"``), for the message.

    Returns:
        A one-line problem naming the option, the path and the fix, or None.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return (f"{option} {path}: is a folder; give a file path such as "
                f"{path / 'results.json'}.")
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        return (f"{option} {path}: {folder} is a file, not a folder; choose another path.")
    try:
        probe_writable(folder)
    except OSError as exc:
        return (f"{option} {path}: cannot write in {folder} ({exc.strerror or exc}); choose a "
                "writable path or fix the folder's permissions.")
    return None


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or its closest ancestor that exists."""
    absolute = folder.absolute()
    # The file system root always exists, so the search always ends.
    return next(candidate for candidate in (absolute, *absolute.parents) if candidate.exists())
