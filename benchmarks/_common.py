"""Helpers shared by the benchmark scripts: machine facts and atomic JSON results.

Every benchmark writes one JSON file into ``benchmarks/results/`` whose ``"machine"`` entry comes
from :func:`machine_facts`, so a number can always be traced to the hardware, library versions and
commit that produced it.

Example:
    >>> from _common import machine_facts, write_result     # doctest: +SKIP
    >>> write_result("my_bench", {"machine": machine_facts(), "ratio": 1.1})  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Versions are read from package metadata, not by importing: importing deepspeed takes seconds
# and probes accelerators.
_PACKAGES = ("torch", "transformers", "deepspeed", "sentence-transformers", "tokenizers",
             "triton", "numpy", "scipy")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """Hardware, library and repository facts for a benchmark record.

    Returns:
        ``{"cpu_model", "logical_cpus", "usable_cpus", "torch_threads", "python", "platform",
        "versions": {package: version}, "git_commit", "git_dirty", "timestamp_utc"}``.
        ``git_commit`` is None before the first commit; ``git_dirty`` says whether the work tree
        differed from it (benchmarks are often run on uncommitted code).
    """
    try:
        import torch

        threads: int | None = torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        threads, cuda = None, None
    status = _git("status", "--porcelain")
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "gpu": cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: package_version(name) for name in _PACKAGES},
        "git_commit": _git("rev-parse", "--verify", "--quiet", "HEAD") or None,
        "git_dirty": bool(status) if status is not None else None,
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (portable in the JSON), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_result(name: str, document: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``results_dir/<name>.json`` atomically (temp file + rename).

    A benchmark killed halfway never leaves a truncated JSON behind; the temp file matches the
    ``benchmarks/results/*.tmp`` ignore rule.

    Args:
        name: File stem, e.g. ``"eval_speed"``.
        document: JSON-serialisable mapping.
        results_dir: Folder; default ``benchmarks/results``.

    Returns:
        Path of the written file.
    """
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = folder / f"{name}.json.tmp"
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
