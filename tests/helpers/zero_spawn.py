"""Run a function on W real ranks (separate processes, CPU gloo) with a hard timeout.

``run_ranks("path/to/file.py:worker", world_size=2, args={...})`` starts W fresh interpreters with
the variables ``torchrun`` would export (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a
free port), so code under test initialises its process group exactly as it does under a launcher.
Each rank calls ``worker(rank, world_size, args)``; its return value is saved with ``torch.save``
and handed back in rank order. A rank that fails, or a job that outlives ``timeout`` seconds, kills
the whole job (its own process group only) and raises with the tail of every rank's log.

Run as a script, this file is the child-side entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pcc_dist.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "<no output>"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def engine_accelerator_env(world_size: int) -> dict[str, str]:
    """The accelerator DeepSpeed is told to use, matching the backend the engine picks.

    ``pcc_dist.distributed.init_distributed`` takes NCCL whenever CUDA is available, so on a host
    with a GPU per rank DeepSpeed must use its CUDA accelerator too (a CPU accelerator beside NCCL
    fails). With fewer GPUs than ranks NCCL cannot run (two ranks on one GPU), so the ranks see
    no GPU at all and both sides take the CPU path (gloo, DeepSpeed's CPU accelerator).
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return {"DS_ACCELERATOR": "cuda"}
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def run_ranks(
    target: str,
    world_size: int = 2,
    args: dict[str, Any] | None = None,
    timeout: float = 150.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``target`` (``"file.py:function"``) on ``world_size`` ranks; return their results.

    Args:
        target: Path of a Python file and the name of a function ``(rank, world_size, args)``.
        world_size: Number of ranks W.
        args: JSON-serialisable arguments passed to every rank.
        timeout: Hard limit for the whole job, in seconds.
        env: Extra environment variables for the children.

    Returns:
        The return values of the ranks, in rank order.

    Raises:
        RuntimeError: when a rank fails or the job times out (with every rank's log tail).
    """
    workdir = Path(tempfile.mkdtemp(prefix="pcc_spawn_"))
    port = free_port()
    procs: list[tuple[subprocess.Popen, Path]] = []
    base_env = dict(os.environ)
    base_env.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            # Two cores are shared by every rank: one intra-op thread each avoids oversubscription.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            **engine_accelerator_env(world_size),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), base_env.get("PYTHONPATH", "")])
            ),
            "PYTHONWARNINGS": "ignore",
        }
    )
    base_env.update(env or {})
    (workdir / "args.json").write_text(json.dumps(args or {}))
    for rank in range(world_size):
        child_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
        log = workdir / f"rank{rank}.log"
        with open(log, "wb") as handle:
            proc = subprocess.Popen(
                [sys.executable, __file__, target, str(workdir), str(rank)],
                env=child_env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        procs.append((proc, log))

    def kill_all() -> None:
        for proc, _ in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc, _ in procs:
            proc.wait()

    def report(reason: str) -> str:
        parts = [reason]
        for rank, (proc, log) in enumerate(procs):
            parts.append(f"--- rank {rank} (exit {proc.returncode}) ---\n{_tail(log)}")
        return "\n".join(parts)

    deadline = time.monotonic() + timeout
    while True:
        codes = [proc.poll() for proc, _ in procs]
        if any(code not in (None, 0) for code in codes):
            time.sleep(1.0)  # let the other ranks print their side of the failure
            kill_all()
            raise RuntimeError(report("a rank failed"))
        if all(code == 0 for code in codes):
            break
        if time.monotonic() > deadline:
            kill_all()
            raise RuntimeError(report(f"timed out after {timeout:.0f} s"))
        time.sleep(0.2)

    import torch

    results = [
        torch.load(workdir / f"result{rank}.pt", weights_only=False) for rank in range(world_size)
    ]
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def _child(target: str, workdir: str, rank: int) -> None:
    import torch

    file, _, name = target.rpartition(":")
    spec = importlib.util.spec_from_file_location("_pcc_spawn_target", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = json.loads((Path(workdir) / "args.json").read_text())
    result = getattr(module, name)(rank, int(os.environ["WORLD_SIZE"]), args)
    torch.save(result, Path(workdir) / f"result{rank}.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
