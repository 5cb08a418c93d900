"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1 (sqlite store in a temp folder).

One server per module (started once, SIGKILLed and restarted once by the outage test, stopped
at teardown). The training loop is the stand-in from ``_mlflow_server.py``; swap in the real
launcher later and keep the read-back assertions.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _mlflow_server import (
    EVAL_KEY,
    TRAIN_KEYS,
    artifact_paths,
    assert_steps_once,
    fake_training_loop,
)

from pcc_dist.config import load_config
from pcc_dist.tracking import JOURNAL_NAME, read_journal, sync_main

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("_mlflow_server.py")


@pytest.fixture
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(out: Path, uri: str, experiment: str):
    return load_config(None, [f"run.output_dir={out}", f"tracking.tracking_uri={uri}",
                              f"tracking.experiment={experiment}", "run.name=e2e"])


def _tracking_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("pcc_dist.tracking") and r.levelno >= logging.WARNING]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_server_killed_mid_run_then_sync_uploads_everything_once(server, client, tmp_path,
                                                                  caplog):
    caplog.set_level(logging.INFO, logger="pcc_dist.tracking")
    out = tmp_path / "run"
    cfg = _cfg(out, server.uri, "outage")

    def kill_at_8(step: int) -> None:
        if step == 8:
            server.kill()

    run_id = fake_training_loop(cfg, out / "stage1", stage="stage1", steps=20, on_step=kill_at_8)

    # The loop finished; exactly one warning, naming the URI and the journal.
    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    journal = out / "stage1" / JOURNAL_NAME
    assert server.uri in warnings[0].getMessage() and str(journal) in warnings[0].getMessage()
    records = read_journal(journal)
    pending_steps = sorted({r["step"] for r in records
                            if r["kind"] == "metrics" and r["synced"] is False})
    assert pending_steps == list(range(9, 21))
    assert not run_id.startswith("local-")  # created before the kill

    server.start()  # same port, same sqlite store
    assert sync_main([str(out), "--tracking-uri", server.uri]) == 0

    assert_steps_once(client, run_id, TRAIN_KEYS, range(1, 21))
    assert_steps_once(client, run_id, [EVAL_KEY], [5, 10, 15, 20])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage2.lr"] == "0.0005"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "3"
    assert run.data.tags["pcc.world_size"] == "1" and run.data.tags["pcc.stage"] == "stage1"
    assert {"config/config.yaml", "plots/metrics.png", "eval/eval.json"} <= \
        artifact_paths(client, run_id)

    # Stage 2 with the server up: nested under the same pipeline run as stage 1.
    run2 = fake_training_loop(cfg, out / "stage2", stage="stage2", steps=5)
    parent = run.data.tags["mlflow.parentRunId"]
    assert client.get_run(run2).data.tags["mlflow.parentRunId"] == parent
    pipeline = client.get_run(parent)
    assert pipeline.data.tags["pcc.role"] == "pipeline" and pipeline.info.status == "FINISHED"
    assert pipeline.data.tags["pcc.pipeline_id"] == run.data.tags["pcc.pipeline_id"]
    assert_steps_once(client, run2, TRAIN_KEYS, range(1, 6))

    # Idempotent: a second sync uploads nothing and duplicates nothing.
    assert sync_main([str(out), "--tracking-uri", server.uri]) == 0
    assert_steps_once(client, run_id, TRAIN_KEYS, range(1, 21))
    assert len(_tracking_warnings(caplog)) == 1


def test_killed_trainer_resumes_same_run_without_duplicate_or_missing_steps(server, client,
                                                                             tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt.json"
    cmd = [sys.executable, str(HELPER), "fake-train", "--output-dir", str(out), "--steps", "12",
           "--checkpoint", str(ckpt), "--crash-at", "8", f"tracking.tracking_uri={server.uri}",
           "tracking.experiment=resume"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    saved = json.loads(ckpt.read_text())
    assert saved["step"] == 5  # steps 6-8 were logged after the last checkpoint

    # Resume from the checkpoint: steps 6-8 are replayed and must not be logged twice.
    cfg = _cfg(out, server.uri, "resume")
    run_id = fake_training_loop(cfg, out / "stage1", stage="stage1", steps=12, start_step=6,
                                resume_run_id=saved["tracking_run_id"])
    assert run_id == saved["tracking_run_id"]
    assert_steps_once(client, run_id, TRAIN_KEYS, range(1, 13))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 2  # + parent


def test_nonzero_rank_sends_no_request_to_the_server(server, tmp_path):
    before = server.api_requests()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from _mlflow_server import main; "
            "main(sys.argv[2:]); assert 'mlflow' not in sys.modules, 'rank 1 imported mlflow'")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(HELPER.parent), "fake-train", "--output-dir",
         str(tmp_path / "run"), "--rank", "1", "--steps", "5",
         f"tracking.tracking_uri={server.uri}"],
        env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.api_requests() == before
    assert not (tmp_path / "run" / "stage1" / JOURNAL_NAME).exists()
