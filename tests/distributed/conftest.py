"""Distributed tests: make the rank launcher importable as ``from _spawn import run_ranks``.

The folder is put on ``sys.path`` explicitly so the import works whatever pytest's import mode and
whether or not the test folders are packages. See ``_spawn.py`` for the launcher itself.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
