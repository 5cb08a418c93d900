"""Helpers shared by the suite's folders: tiny models, rank spawners, launch helpers.

* ``tiny_models``: tiny random Llama / BERT models and word tokenizers, built offline.
* ``near_cosines``: near-duplicate embedding pairs for conditioning tests of the losses.
* ``spawn``: :func:`spawn.run_ranks`, a function on W gloo ranks (one process group per job).
* ``zero_spawn``: :func:`zero_spawn.run_ranks`, ``file.py:function`` on W ranks with the variables
  ``torchrun`` exports, for code that builds its own process group (DeepSpeed engines).
* ``runs``: ``pcc-train`` launch helpers of the reliability and launcher tests.
* :func:`load_benchmark`: a script of ``benchmarks/`` as a module.

Importable as ``helpers`` everywhere in the suite: pytest's default ``prepend`` import mode puts
``tests/`` on ``sys.path`` when it loads ``tests/conftest.py`` (the test folders are not
packages), and the spawners' rank processes put it there themselves.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``name``.

    The scripts import their siblings (``_common``), so ``benchmarks/`` goes on ``sys.path``
    (once, here) rather than each test inserting it.
    """
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)
