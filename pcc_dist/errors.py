"""The one base class of pcc_dist's expected failures.

An expected failure is a mistake the user can fix (a config field, a data row, a model folder,
an export target): its message names the file, field or value and the fix, so a command-line
entry point prints the message and exits with a non-zero code instead of a traceback. Every
such error class subclasses :class:`PccError`, so each entry point catches them in one clause.

Each class also keeps the built-in base it had before (``ConfigError`` is still a
``ValueError``, ``CheckpointError`` a ``RuntimeError``), so code that catches those still does.
This module imports nothing from pcc_dist: every layer can import it.
"""

from __future__ import annotations


class PccError(Exception):
    """An expected failure: the message says what is wrong and how to fix it; print it, no
    traceback, and exit non-zero (the code is the entry point's: 1 or 2, see each CLI)."""
