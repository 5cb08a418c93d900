"""Environment tags: package versions, topology, code version and host of a run."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

ENV_TAG_PACKAGES = ("pcc-dist", "torch", "deepspeed", "transformers", "peft", "bitsandbytes",
                    "mlflow")


def _git_commit() -> tuple[str, str]:
    """(commit, dirty) of the checkout holding this package; ("unknown", "unknown") if none."""
    if os.environ.get("PCC_GIT_COMMIT"):
        return os.environ["PCC_GIT_COMMIT"], "unknown"
    # parents[2]: pcc_dist/tracking/environment.py -> the checkout holding pcc_dist/.
    root = str(Path(__file__).resolve().parents[2])
    try:
        # 5 s: `git status` on a large or network-mounted checkout can be slow; never block start.
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return head or "unknown", "true" if status else "false"


def environment_tags(world_size: int, nodes: int) -> dict[str, str]:
    """Tags that make a run reproducible: package versions, topology, code version, host.

    Args:
        world_size: Number of training processes W.
        nodes: Number of machines.

    Returns:
        ``pcc.version.<package>`` for torch, deepspeed, transformers, peft, bitsandbytes, mlflow
        and pcc-dist (``"not installed"`` when absent; read from package metadata, nothing is
        imported), ``pcc.python``, ``pcc.world_size``, ``pcc.nodes``, ``pcc.git_commit``,
        ``pcc.git_dirty``, ``pcc.hostname``, and MLflow's own ``mlflow.source.git.commit`` so the
        UI shows the commit.
    """
    tags = {"pcc.world_size": str(int(world_size)), "pcc.nodes": str(int(nodes)),
            "pcc.hostname": socket.gethostname(), "pcc.python": platform.python_version()}
    for package in ENV_TAG_PACKAGES:
        try:
            tags[f"pcc.version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"pcc.version.{package}"] = "not installed"
    commit, dirty = _git_commit()
    tags["pcc.git_commit"] = commit
    tags["pcc.git_dirty"] = dirty
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def topology_from_env() -> tuple[int, int]:
    """(world size, nodes) as set by torchrun / the deepspeed launcher / slurm; (1, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local > 0:
        return world, max(1, world // local)
    return world, int(os.environ.get("SLURM_NNODES", os.environ.get("NNODES", "1")) or 1)
