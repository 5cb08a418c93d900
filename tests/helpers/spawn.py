"""Run a function on W real CPU ranks (gloo) in fresh subprocesses, with a hard timeout.

Reusable by every distributed test::

    from helpers.spawn import run_ranks      # tests/ is on sys.path (see helpers/__init__.py)

    def worker(rank, world_size, scale):          # module level; runs inside every rank
        t = torch.full((1,), float(rank))
        torch.distributed.all_reduce(t)
        return {"sum": t * scale}

    results = run_ranks(worker, 2.0, world_size=2, timeout=120)   # one result per rank

How it works: each rank is ``python spawn.py ...`` (a fresh interpreter, so environment variables
such as ``TRITON_INTERPRET`` are in place before any import). The rank joins a gloo process group on
127.0.0.1 at a free port, imports the worker's *file* by path (independent of pytest's import mode),
calls ``worker(rank, world_size, *args)``, saves the return value with ``torch.save`` and tears the
group down. The parent polls the ranks: the first rank that fails makes it kill the others at once
(after a short grace period: a peer blocked in a collective would otherwise wait for the gloo
timeout), and at ``timeout``
seconds every rank is killed and ``TimeoutError`` is raised, so a hang fails instead of blocking CI.
Errors carry the tail of each rank's log. A port taken between probing and binding is retried.

Arguments and return values travel through ``torch.save``/``torch.load``: use tensors, numbers,
strings, lists and dicts (not classes defined in the test module).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pcc_dist.distributed import free_port

__all__ = ["free_port", "run_ranks"]

_POLL_SECONDS = 0.05
_LOG_TAIL_CHARS = 4000
_PORT_ATTEMPTS = 3
_FAILURE_GRACE = 5.0


def _tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL_CHARS:]
    except OSError:
        return "<no log>"


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _launch(
    fn, world_size, timeout, env, threads, workdir: Path, port: int
) -> list[subprocess.Popen]:
    child_env = dict(os.environ)
    child_env.update({"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    child_env.update(env or {})
    procs = []
    for rank in range(world_size):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--file",
            inspect.getsourcefile(fn),
            "--name",
            fn.__name__,
            "--workdir",
            str(workdir),
            "--rank",
            str(rank),
            "--world-size",
            str(world_size),
            "--port",
            str(port),
            "--pg-timeout",
            str(max(int(timeout), 1)),
            "--threads",
            str(threads),
        ]
        log = open(workdir / f"rank{rank}.log", "wb")  # noqa: SIM115 (closed after the child exits)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env))
        log.close()
    return procs


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    Args:
        fn: A module-level function of an importable file (a test module is fine).
        *args: Extra arguments, passed through ``torch.save``.
        world_size: Number of ranks W.
        timeout: Hard wall-clock limit in seconds for the whole run (start-up included).
        env: Extra environment variables for the ranks (set before Python starts).
        threads: ``OMP_NUM_THREADS`` and torch threads per rank (this machine has 2 cores).

    Returns:
        ``[result of rank 0, ..., result of rank W − 1]``.

    Raises:
        TimeoutError: The ranks did not all finish within ``timeout``; all were killed.
        RuntimeError: A rank failed; the message holds every rank's log tail.
    """
    import torch

    if fn.__qualname__ != fn.__name__:
        raise ValueError(f"run_ranks needs a module-level function, got {fn.__qualname__}")
    workdir = Path(tempfile.mkdtemp(prefix="pcc_ranks_"))
    try:
        torch.save(list(args), workdir / "args.pt")
        deadline = time.monotonic() + timeout
        for attempt in range(_PORT_ATTEMPTS):
            procs = _launch(fn, world_size, timeout, env, threads, workdir, free_port())
            failed = _wait(procs, deadline)
            logs = "\n".join(
                f"--- rank {r} (exit {p.returncode}) ---\n{_tail(workdir / f'rank{r}.log')}"
                for r, p in enumerate(procs)
            )
            if failed is None:
                raise TimeoutError(
                    f"{world_size} ranks did not finish within {timeout:.0f} s; killed\n{logs}"
                )
            if not failed:
                return [
                    torch.load(workdir / f"result{r}.pt", weights_only=False)
                    for r in range(world_size)
                ]
            if "Address already in use" in logs and attempt + 1 < _PORT_ATTEMPTS:
                continue
            raise RuntimeError(f"rank(s) {failed} failed\n{logs}")
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], deadline: float) -> list[int] | None:
    """[] when all ranks exit 0, the failed ranks, or None on timeout. Kills leftovers.

    After the first failure the others get ``_FAILURE_GRACE`` seconds to exit on their own, so
    the report names the rank that raised as well as peers that died of its closed connection.
    """
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(code == 0 for code in codes):
                return []
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            now = time.monotonic()
            if failed and first_failure is None:
                first_failure = now
            if failed and (None not in codes or now - first_failure >= _FAILURE_GRACE):
                return failed
            if now >= deadline:
                return None
            time.sleep(_POLL_SECONDS)
    finally:
        _kill(procs)


def _rank_main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--file", "--name", "--workdir"):
        parser.add_argument(name, required=True)
    for name in ("--rank", "--world-size", "--port", "--pg-timeout", "--threads"):
        parser.add_argument(name, type=int, required=True)
    opts = parser.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(opts.threads)
    workdir = Path(opts.workdir)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{opts.port}",
        rank=opts.rank,
        world_size=opts.world_size,
        timeout=datetime.timedelta(seconds=opts.pg_timeout),
    )
    try:
        spec = importlib.util.spec_from_file_location("_pcc_rank_worker", opts.file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        args = torch.load(workdir / "args.pt", weights_only=False)
        result = getattr(module, opts.name)(opts.rank, opts.world_size, *args)
        torch.save(result, workdir / f"result{opts.rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # The worker's file imports helpers.* like every test module: tests/ goes on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _rank_main()
