"""A real ``mlflow server`` for end-to-end tests, and helpers to read runs back.

:class:`MlflowServer` starts ``mlflow server --host 127.0.0.1 --port P --workers 1
--backend-store-uri sqlite:///<root>/mlflow.db --artifacts-destination <root>/artifacts`` in its own
process group, waits for ``GET /health`` and can SIGKILL it (a crash) and start it again on the
same port and store. Binding is 127.0.0.1 unless ``host`` says otherwise; output goes to
``<root>/server.log`` (also the place to count requests).

:func:`fake_training_loop` stands in for the trainer until the real one exists: it makes the same
tracker calls (params, per-step ``train/``/``perf/`` metrics with explicit steps, ``eval/`` metrics,
an eval JSON artifact, a checkpoint JSON holding the run id). Run it in-process, or as a
subprocess with ``python tests/e2e/_mlflow_server.py fake-train ...`` (which can SIGKILL itself
at a step, like a crashed trainer).

Example:
    >>> with MlflowServer(tmp_path) as server:               # doctest: +SKIP
    ...     run_id = fake_training_loop(cfg, run_dir, stage="stage1", steps=20)
    ...     assert_steps_once(MlflowClient(server.uri), run_id, TRAIN_KEYS, range(1, 21))
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from pcc_dist.distributed import free_port

TRAIN_KEYS = ("train/loss", "train/pearson_r", "train/lr", "train/grad_norm",
              "train/skipped_steps", "perf/pairs_per_s", "perf/tokens_per_s")
EVAL_KEY = "eval/stsb_dev_spearman"


class MlflowServer:
    """One ``mlflow server`` process group on a sqlite store in ``root``.

    Args:
        root: Folder for ``mlflow.db``, ``artifacts/`` and ``server.log``.
        host: Interface to bind; loopback only by default.
        port: Fixed port, or None for a free one (kept across restarts).
        workers: uvicorn workers; 1 keeps the 2-core test machine free.
        extra_env: Environment for the server process (e.g. ``MLFLOW_*`` server settings).
    """

    def __init__(self, root: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 workers: int = 1, extra_env: dict[str, str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.workers = workers
        self.extra_env = dict(extra_env or {})
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", self.host,
                "--port", str(self.port), "--workers", str(self.workers),
                "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.artifacts)]

    def healthy(self) -> bool:
        # No proxy: a proxy from the environment must not answer for 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 90.0) -> MlflowServer:
        """Start and wait until ``/health`` answers (~5-10 s here; first start migrates the DB).

        Raises:
            RuntimeError: the server exited or did not become healthy; includes the log tail.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = self.log_path.open("a")
        # The server takes its store from the command line, not from the caller's MLFLOW_* env.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # MLflow's job runner is one more Python process importing MLflow (~seconds of start-up
        # on 2 shared cores); tracking does not use it.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.update(self.extra_env)
        # Own process group: uvicorn and MLflow's job runner are children; kill() ends them all.
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=self.root,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group we created: pgid == our child's pid
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole server (a crash: no shutdown handlers run)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # stragglers of the group, if any
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self, timeout: float = 90.0) -> MlflowServer:
        """Start again on the same port and store."""
        self.stop()
        return self.start(timeout)

    def api_requests(self) -> int:
        """REST calls the server has logged so far (uvicorn access lines for /api/)."""
        if not self.log_path.exists():
            return 0
        return sum('"POST /api/' in line or '"GET /api/' in line
                   for line in self.log_path.read_text(errors="replace").splitlines())

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "<no log>"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Reading runs back.
# --------------------------------------------------------------------------------------------


def metric_steps(client, run_id: str, key: str) -> list[int]:
    """Every logged step of ``key`` (with repeats, sorted)."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_steps_once(client, run_id: str, keys: Iterable[str], steps: Iterable[int]) -> None:
    """Each key holds exactly ``steps``: none missing, none twice."""
    expected = sorted(steps)
    for key in keys:
        got = metric_steps(client, run_id, key)
        twice = sorted(s for s, n in Counter(got).items() if n > 1)
        assert got == expected, (f"{key}: steps {got} != {expected}; duplicated {twice}, "
                                 f"missing {sorted(set(expected) - set(got))}")


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """All artifact file paths of a run, recursively."""
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= artifact_paths(client, run_id, info.path)
        else:
            out.add(info.path)
    return out


# --------------------------------------------------------------------------------------------
# The stand-in trainer.
# --------------------------------------------------------------------------------------------


def fake_training_loop(cfg, run_dir: str | Path, *, stage: str, steps: int, start_step: int = 1,
                       rank: int = 0, resume_run_id: str | None = None,
                       checkpoint: str | Path | None = None, checkpoint_every: int = 5,
                       crash_at: int | None = None, eval_every: int = 5,
                       on_step: Callable[[int], None] | None = None,
                       step_seconds: float = 0.0) -> str | None:
    """Log like the trainer does, for steps ``start_step..steps``; returns the run id.

    Args:
        cfg: Resolved :class:`~pcc_dist.config.PccConfig`.
        run_dir: The stage folder handed to ``make_tracker``.
        stage: ``"stage1"`` or ``"stage2"``.
        steps: Last step.
        start_step: First step (``checkpoint step + 1`` when resuming).
        rank: Global rank of this process.
        resume_run_id: The checkpoint's tracking run id.
        checkpoint: JSON file written every ``checkpoint_every`` steps with the step and the
            tracking run id (the trainer stores the same in ``trainer_state.json``).
        crash_at: SIGKILL this process right after logging this step.
        eval_every: Log ``eval/stsb_dev_spearman`` every that many steps.
        on_step: Called after each step (e.g. to kill the server mid-run).
        step_seconds: Sleep per step.
    """
    from pcc_dist.tracking import make_tracker

    run_dir = Path(run_dir)
    tracker = make_tracker(cfg, run_dir, rank=rank, resume_run_id=resume_run_id, stage=stage)
    tracker.log_params({"deepspeed": {"train_batch_size": 8, "gradient_clipping": 1.0,
                                      "zero_optimization": {"stage": 3}}})
    for step in range(start_step, steps + 1):
        tracker.log_metrics({
            "train/loss": 2.0 / step, "train/pearson_r": 1.0 - 1.0 / (step + 1),
            "train/lr": 5e-4 * min(1.0, step / 5), "train/grad_norm": 1.0 / step,
            "train/skipped_steps": 0.0, "perf/pairs_per_s": 40.0 + step,
            "perf/tokens_per_s": 2000.0 + step}, step=step)
        if eval_every and step % eval_every == 0:
            tracker.log_metrics({EVAL_KEY: 0.5 + step / 100}, step=step)
        if checkpoint is not None and step % checkpoint_every == 0:
            Path(checkpoint).write_text(json.dumps({"step": step,
                                                    "tracking_run_id": tracker.run_id}))
        if on_step is not None:
            on_step(step)
        if crash_at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step_seconds:
            time.sleep(step_seconds)
    if rank == 0:
        eval_json = run_dir / "eval.json"
        eval_json.write_text(json.dumps({"STSBenchmark": 0.7, "steps": steps}))
        tracker.log_artifact(eval_json, "eval")
    tracker.close()
    return tracker.run_id


def main(argv: list[str] | None = None) -> int:
    """``fake-train``: the stand-in trainer as a process (for kill / resume / rank tests)."""
    parser = argparse.ArgumentParser(prog="_mlflow_server.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    fake = sub.add_parser("fake-train")
    fake.add_argument("--output-dir", required=True)
    fake.add_argument("--stage", default="stage1")
    fake.add_argument("--steps", type=int, default=20)
    fake.add_argument("--start-step", type=int, default=1)
    fake.add_argument("--rank", type=int, default=0)
    fake.add_argument("--resume-run-id")
    fake.add_argument("--checkpoint")
    fake.add_argument("--crash-at", type=int)
    fake.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args(argv)
    from pcc_dist.config import load_config

    cfg = load_config(None, [f"run.output_dir={args.output_dir}", *args.overrides])
    fake_training_loop(cfg, Path(args.output_dir) / args.stage, stage=args.stage,
                       steps=args.steps, start_step=args.start_step, rank=args.rank,
                       resume_run_id=args.resume_run_id, checkpoint=args.checkpoint,
                       crash_at=args.crash_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())

