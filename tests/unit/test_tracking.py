"""pcc_dist.tracking without a server: a file-based sqlite store (one per module, ~6 s to create),
a closed port for "unreachable", a silent socket for "hung", and injected failures."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pcc_dist.config import load_config
from pcc_dist.tracking import (
    JOURNAL_NAME,
    REDACTED,
    MlflowTracker,
    NullTracker,
    Tracker,
    environment_tags,
    make_tracker,
    plot_metrics,
    read_journal,
    redact,
    redact_text,
    sync_main,
)

SECRET = "hf_secret123"
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(sqlite_mlflow_store):
    """URI of the module's sqlite store (tests/conftest.py); each test uses its own experiment."""
    return sqlite_mlflow_store[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("PCC_MLFLOW_RETRY_S", "PCC_MLFLOW_RETRY_MAX_S", "PCC_MLFLOW_HTTP_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def cfg_for(tmp_path: Path, uri: str, experiment: str, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}",
                              f"tracking.tracking_uri={uri}", f"tracking.experiment={experiment}",
                              "run.name=unit", *overrides])


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("pcc_dist.tracking") and r.levelno >= logging.WARNING]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Redaction and tags (no MLflow)
# --------------------------------------------------------------------------------------------


def test_redact_replaces_secret_env_values_token_shapes_and_secret_keys(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-very-secret-value")
    out = redact({
        "data.root": SECRET,                                    # equals an env secret
        "model.name_or_path": f"/cache/{SECRET}/model",         # contains it
        "other": "aws-very-secret-value",
        "hub.token": "anything",                                # key names a credential
        "db_password": "x" * 3,
        "gh": "ghp_" + "a" * 36,                                # token shape
        "uri": "https://alice:pw0rd@host.example/path",         # URL password
        "nested": {"api_key": "k", "ok": 1},
        "list": ["fine", SECRET],
        "stage2.lr": 5e-4, "run.name": "pcc", "max_tokens": "512", "use_auth_token": True,
    })
    for key in ("data.root", "model.name_or_path", "other", "hub.token", "db_password", "gh"):
        assert out[key] == REDACTED, key
    assert out["uri"] == "https://alice:***@host.example/path"
    assert out["nested"] == {"api_key": REDACTED, "ok": 1}
    assert out["list"] == ["fine", REDACTED]
    assert (out["stage2.lr"], out["run.name"], out["max_tokens"], out["use_auth_token"]) == \
        (5e-4, "pcc", "512", True)


def test_redact_leaves_short_and_non_secret_env_values(monkeypatch):
    # Negative control: a secret-named env var "1" or a non-secret name must not redact params.
    monkeypatch.setenv("HF_HUB_DISABLE_TOKEN", "1")
    monkeypatch.setenv("DATA_HOME", "/data/shared/corpus")
    params = {"train.log_every_steps": 1, "data.root": "/data/shared/corpus", "flag": "1"}
    assert redact(params) == params


def test_redact_text(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "zz-top-secret-zz")
    text = f"root: /x/{SECRET}\nkey: zz-top-secret-zz\nurl: s3://u:p@bucket\n"
    monkeypatch.setenv("HF_TOKEN", SECRET)
    clean = redact_text(text)
    assert SECRET not in clean and "zz-top-secret-zz" not in clean and "u:p@" not in clean
    assert clean.count(REDACTED) == 3


def test_environment_tags():
    tags = environment_tags(world_size=4, nodes=2)
    assert tags["pcc.world_size"] == "4" and tags["pcc.nodes"] == "2"
    for package in ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "mlflow"):
        assert tags[f"pcc.version.{package}"]
    assert tags["pcc.version.mlflow"] == "3.17.2"
    assert tags["pcc.hostname"] == socket.gethostname()
    assert tags["pcc.git_commit"]
    assert all(isinstance(v, str) for v in tags.values())


# --------------------------------------------------------------------------------------------
# Null tracker: no MLflow import, no files
# --------------------------------------------------------------------------------------------


def test_null_tracker_never_imports_mlflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from pcc_dist.config import load_config
        from pcc_dist.tracking import NullTracker, make_tracker
        assert "mlflow" not in sys.modules, "importing pcc_dist.tracking imported mlflow"
        run = Path({str(tmp_path / 'run')!r})
        cfg = load_config(None, [f"run.output_dir={{run}}",
                                 "tracking.tracking_uri=http://127.0.0.1:9"])
        none = load_config(None, [f"run.output_dir={{run}}", "tracking.backend=none"])
        for tracker in (make_tracker(cfg, run, rank=1, stage="stage1"),
                        make_tracker(cfg, run, rank=3, resume_run_id="abc", stage="stage2"),
                        make_tracker(none, run, rank=0, stage="stage1")):
            assert isinstance(tracker, NullTracker) and tracker.run_id is None
            tracker.log_params({{"a": 1}}); tracker.set_tags({{"b": "c"}})
            tracker.log_metrics({{"train/loss": 1.0}}, step=1)
            tracker.log_artifact(sys.executable); tracker.close("FAILED")
        assert "mlflow" not in sys.modules, sorted(m for m in sys.modules if "mlflow" in m)
        assert not run.exists(), list(run.rglob("*"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_missing_mlflow_names_the_pin(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    cfg = cfg_for(tmp_path, "sqlite:///x.db", "e")
    with pytest.raises(ImportError, match=r"pip install mlflow==3\.17\.2"):
        make_tracker(cfg, tmp_path / "run", rank=0)
    assert isinstance(make_tracker(cfg, tmp_path / "run", rank=1), NullTracker)


def test_trackers_satisfy_the_protocol(store, tmp_path):
    assert isinstance(NullTracker(), Tracker)
    with make_tracker(cfg_for(tmp_path, store, "proto"), tmp_path / "run", rank=0) as tracker:
        assert isinstance(tracker, MlflowTracker) and isinstance(tracker, Tracker)


def test_mlflow_http_limits_hold_only_while_a_tracker_is_open(store, tmp_path, monkeypatch):
    # MLflow reads its HTTP timeout from the environment: the tracker's 2 s must not outlive it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with make_tracker(cfg_for(tmp_path, store, "limits"), tmp_path / "run", rank=0) as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


# --------------------------------------------------------------------------------------------
# Against a file-based sqlite store
# --------------------------------------------------------------------------------------------


def test_secrets_never_reach_params_tags_artifacts_or_run_folder(store, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = cfg_for(tmp_path, store, "secrets", f"data.root=/data/{SECRET}")
    secret_file = tmp_path / "notes.txt"  # outside the run folder: the user's own file
    secret_file.write_text(f"token={SECRET}\nplain line\n")
    run_dir = tmp_path / "run" / "stage1"
    tracker = make_tracker(cfg, run_dir, rank=0, stage="stage1")
    tracker.log_params({"hub": {"token": SECRET}, "auth_url": f"https://me:{SECRET}@hub"})
    tracker.set_tags({"note": f"made with {SECRET}", "hub_token": SECRET})
    tracker.log_artifact(secret_file, "notes")
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.close()

    client = client_for(store)
    for run_id in (tracker.run_id, tracker.parent.run_id):
        run = client.get_run(run_id)
        assert run.data.params["data.root"] == REDACTED
        text = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in text
        downloaded = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        for file in downloaded.rglob("*"):
            if file.is_file():
                assert SECRET.encode() not in file.read_bytes(), file
    notes = (tmp_path / tracker.run_id / "notes" / "notes.txt").read_text()
    assert "plain line" in notes and REDACTED in notes
    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_params_metrics_and_limits_round_trip(store, tmp_path, caplog):
    cfg = cfg_for(tmp_path, store, "roundtrip")
    tracker = make_tracker(cfg, tmp_path / "run" / "stage2", rank=0, stage="stage2")
    tracker.log_params({"deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled":
                                                                                 False}},
                        "long": "x" * 7000, "tasks": ["STS12", "STS13"]})
    tracker.log_metrics({"train/loss": 0.5, "train/grad_norm": math.nan, "bad key!": 1.0},
                        step=3)
    tracker.log_metrics({"train/loss": 0.4}, step=7)
    tracker.log_metrics({"train/loss": 0.9}, step=7)  # same step again: skipped
    tracker.close()
    run = client_for(store).get_run(tracker.run_id)
    params = run.data.params
    assert params["deepspeed.zero_optimization.stage"] == "3"
    assert params["deepspeed.bf16.enabled"] == "False"
    assert params["long"] == "x" * 6000  # MLflow 3.17 MAX_PARAM_VAL_LENGTH
    assert params["tasks"] == '["STS12", "STS13"]'
    assert params["stage2.lr"] == "0.0005" and params["tracking.experiment"] == "roundtrip"
    assert run.data.tags["pcc.stage"] == "stage2" and run.data.tags["pcc.world_size"] == "1"
    history = client_for(store).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(3, 0.5), (7, 0.4)]
    assert math.isnan(run.data.metrics["train/grad_norm"])
    assert "bad key!" not in run.data.metrics
    assert any("bad key!" in m for m in tracking_warnings(caplog))


def test_stage_runs_nest_under_one_pipeline_run(store, tmp_path):
    cfg = cfg_for(tmp_path, store, "link")
    out = tmp_path / "run"
    s1 = make_tracker(cfg, out / "stage1", rank=0, stage="stage1")
    s1.log_metrics({"train/loss": 1.0}, step=1)
    s1.close()
    s2 = make_tracker(cfg, out / "stage2", rank=0, stage="stage2")
    s2.log_metrics({"train/loss": 0.5}, step=1)
    s2.close()
    with make_tracker(cfg, out, rank=0) as pipeline:  # the pipeline run itself, for STS7
        pipeline.log_metrics({"eval/sts_avg": 80.0}, step=0)

    client = client_for(store)
    parent = client.get_run(pipeline.run_id)
    assert s1.parent.run_id == s2.parent.run_id == pipeline.run_id
    assert parent.data.tags["pcc.role"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params["stage1.lr"] == "0.0005"
    for child, stage in ((s1, "stage1"), (s2, "stage2")):
        run = client.get_run(child.run_id)
        assert run.data.tags["mlflow.parentRunId"] == pipeline.run_id
        assert run.data.tags["pcc.pipeline_id"] == parent.data.tags["pcc.pipeline_id"]
        assert run.info.run_name == f"unit-{stage}"
    # A fresh stage 1 in the same folder starts a new pipeline (a new two-stage story).
    again = make_tracker(cfg, out / "stage1", rank=0, stage="stage1")
    again.close()
    assert again.parent.run_id != pipeline.run_id


def test_explicit_parent_run_id(store, tmp_path):
    cfg = cfg_for(tmp_path, store, "explicit")
    client = client_for(store)
    outer = client.create_run(client.get_experiment_by_name("explicit").experiment_id
                              if client.get_experiment_by_name("explicit")
                              else client.create_experiment("explicit")).info.run_id
    with make_tracker(cfg, tmp_path / "run" / "stage1", rank=0, stage="stage1",
                      parent_run_id=outer) as tracker:
        assert tracker.parent is None
    assert client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"] == outer


def test_resume_reattaches_without_duplicate_steps(store, tmp_path, caplog):
    cfg = cfg_for(tmp_path, store, "resume")
    run_dir = tmp_path / "run" / "stage1"
    first = make_tracker(cfg, run_dir, rank=0, stage="stage1")
    for step in range(1, 11):
        first.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
    run_id = first.run_id
    # "Crash": no close. The checkpoint holds run_id at step 5; resume replays 6..15.
    second = make_tracker(cfg, run_dir, rank=0, stage="stage1", resume_run_id=run_id)
    assert second.run_id == run_id
    assert client_for(store).get_run(run_id).info.status == "RUNNING"
    for step in range(6, 16):
        second.log_metrics({"train/loss": 1.0 / step, "train/lr": 1e-3}, step=step)
    assert second.skipped_steps == 10  # steps 6-10, two keys
    second.log_params({"stage1.lr": 0.0005})            # same value: fine
    second.log_params({"stage2.lr": 0.001})             # changed on resume
    second.close()
    client = client_for(store)
    assert steps(client, run_id, "train/loss") == list(range(1, 16))
    assert steps(client, run_id, "train/lr") == list(range(1, 16))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["stage2.lr"] == "0.0005"
    assert run.data.tags["pcc.param_changed.stage2.lr"] == "0.001"
    assert any("pcc.param_changed" in m for m in tracking_warnings(caplog))
    assert len(client.search_runs([run.info.experiment_id])) == 2  # stage run + pipeline run


def test_resume_in_a_fresh_folder_uses_the_servers_last_step(store, tmp_path):
    cfg = cfg_for(tmp_path, store, "resume-elsewhere")
    with make_tracker(cfg, tmp_path / "run" / "stage1", rank=0, stage="stage1") as first:
        for step in range(1, 6):
            first.log_metrics({"train/loss": float(step)}, step=step)
    # The checkpoint was copied to another machine: no journal, no tracking.json there.
    other = tmp_path / "elsewhere"
    cfg2 = cfg_for(other, store, "resume-elsewhere")
    with make_tracker(cfg2, other / "run" / "stage1", rank=0, stage="stage1",
                      resume_run_id=first.run_id) as second:
        for step in range(3, 9):
            second.log_metrics({"train/loss": float(step)}, step=step)
    assert second.run_id == first.run_id
    assert steps(client_for(store), first.run_id, "train/loss") == list(range(1, 9))


def test_resume_of_a_run_this_server_lacks_starts_a_new_linked_run(store, tmp_path, caplog):
    cfg = cfg_for(tmp_path, store, "resume-missing")
    ghost = "0123456789abcdef0123456789abcdef"
    with make_tracker(cfg, tmp_path / "run" / "stage2", rank=0, stage="stage2",
                      resume_run_id=ghost) as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=7)
    assert tracker.run_id != ghost and not tracker.run_id.startswith("local-")
    run = client_for(store).get_run(tracker.run_id)
    assert run.data.tags["pcc.resumed_from"] == ghost
    assert steps(client_for(store), tracker.run_id, "train/loss") == [7]
    assert any(ghost in m for m in tracking_warnings(caplog))


def test_outage_warns_once_journals_backs_off_and_flushes_in_order(store, tmp_path, caplog,
                                                                    monkeypatch):
    from mlflow import MlflowClient

    cfg = cfg_for(tmp_path, store, "outage")
    tracker = make_tracker(cfg, tmp_path / "run" / "stage1", rank=0, stage="stage1")
    session = tracker
    now = [1000.0]
    session.clock = lambda: now[0]
    down = [True]
    real_log_batch = MlflowClient.log_batch
    attempts = []

    def flaky_log_batch(self, *args, **kwargs):
        if down[0]:
            attempts.append(now[0])
            raise ConnectionError("connection refused (injected)")
        return real_log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky_log_batch)
    tracker.log_metrics({"train/loss": 1.0}, step=1)          # fails -> offline, retry at +5 s
    for step in range(2, 6):
        now[0] += 1.0                                          # no attempt before 1005
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    now[0] = 1005.0
    tracker.log_metrics({"train/loss": 1 / 6}, step=6)        # attempt, fails -> next at +10 s
    now[0] = 1014.0
    tracker.log_metrics({"train/loss": 1 / 7}, step=7)        # too early
    now[0] = 1015.0
    tracker.log_metrics({"train/loss": 1 / 8}, step=8)        # attempt, fails -> next at +20 s
    assert attempts == [1000.0, 1005.0, 1015.0]
    assert len(tracking_warnings(caplog)) == 1
    assert "sqlite" in tracking_warnings(caplog)[0] and JOURNAL_NAME in tracking_warnings(caplog)[0]
    pending = [r["step"] for r in read_journal(tracker.journal_path)
               if r["kind"] == "metrics" and r["synced"] is False]
    assert pending == list(range(1, 9))

    down[0] = False                                            # server back
    now[0] = 1035.0
    tracker.log_metrics({"train/loss": 1 / 9}, step=9)        # flushes 1..8, then 9, in order
    assert not session.pending and session.online
    tracker.log_metrics({"train/loss": 0.1}, step=10)         # direct path again
    tracker.close()
    history = client_for(store).get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 11))     # insertion order = step order
    assert len(tracking_warnings(caplog)) == 1


def test_rejected_record_is_dropped_without_blocking(store, tmp_path, caplog, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    cfg = cfg_for(tmp_path, store, "reject")
    tracker = make_tracker(cfg, tmp_path / "run", rank=0)
    real = MlflowClient.log_batch

    def picky(self, run_id, metrics=(), params=(), tags=(), **kw):
        if any(m.key == "train/poison" for m in metrics):
            raise MlflowException("bad value (injected)", error_code=INVALID_PARAMETER_VALUE)
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", picky)
    tracker.log_metrics({"train/poison": 1.0}, step=1)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.close()
    assert tracker.online and not tracker.pending
    assert steps(client_for(store), tracker.run_id, "train/loss") == [1]
    assert any("rejected" in m for m in tracking_warnings(caplog))
    assert sync_main([str(tmp_path / "run"), "--tracking-uri", store]) == 0  # nothing to retry


def test_unreachable_at_start_then_sync_uploads_once(store, tmp_path, caplog, capsys):
    dead = f"http://127.0.0.1:{closed_port()}"
    cfg = cfg_for(tmp_path, dead, "offline")
    out = tmp_path / "run"
    started = time.monotonic()
    tracker = make_tracker(cfg, out / "stage1", rank=0, stage="stage1")
    assert tracker.run_id.startswith("local-") and tracker.parent.run_id.startswith("local-")
    for step in range(1, 11):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/pearson_r": step / 10}, step=step)
    tracker.close()
    assert time.monotonic() - started < 20  # connection refused is immediate; no 4-min retries
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and dead in warnings[0] and "sync-mlflow" in warnings[0]
    assert (out / "stage1" / "metrics.png").is_file()

    assert sync_main([str(out), "--tracking-uri", store]) == 0
    assert "uploaded" in capsys.readouterr().out
    state = json.loads((out / "stage1" / "tracking.json").read_text())
    run_id = state["runs"]["stage1"]["run_id"]
    assert run_id and not run_id.startswith("local-")
    client = client_for(store)
    assert steps(client, run_id, "train/loss") == list(range(1, 11))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["stage1.lr"] == "0.0005"
    parent_id = json.loads((out / "tracking.json").read_text())["pipeline"]["run_id"]
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config", "plots"}

    # Idempotent: a second sync finds nothing; a resume with the local id finds the real run.
    assert sync_main([str(out), "--tracking-uri", store]) == 0
    assert "nothing to upload" in capsys.readouterr().out
    cfg_up = cfg_for(tmp_path, store, "offline")
    with make_tracker(cfg_up, out / "stage1", rank=0, stage="stage1",
                      resume_run_id=tracker.run_id) as resumed:
        resumed.log_metrics({"train/loss": 0.05}, step=11)
    assert resumed.run_id == run_id
    assert steps(client, run_id, "train/loss") == list(range(1, 12))


def test_next_stage_uploads_what_the_previous_stage_left_pending(store, tmp_path, caplog,
                                                                  capsys, monkeypatch):
    out = tmp_path / "run"
    # Same config for both stages; the URI comes from the environment (tracking_uri: null).
    cfg = cfg_for(tmp_path, store, "drain", "tracking.tracking_uri=null")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    with make_tracker(cfg, out / "stage1", rank=0, stage="stage1") as s1:
        for step in range(1, 4):
            s1.log_metrics({"train/loss": float(step)}, step=step)
    assert s1.run_id.startswith("local-")
    # The server is back when stage 2 starts: stage 1's journal goes up too, no sync needed.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with make_tracker(cfg, out / "stage2", rank=0, stage="stage2") as s2:
        s2.log_metrics({"train/loss": 0.5}, step=1)
    client = client_for(store)
    stage1 = json.loads((out / "stage1" / "tracking.json").read_text())["runs"]["stage1"]
    assert steps(client, stage1["run_id"], "train/loss") == [1, 2, 3]
    parent = client.get_run(s2.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(stage1["run_id"]).data.tags["mlflow.parentRunId"] == parent
    assert len(client.search_runs([client.get_run(parent).info.experiment_id])) == 3
    assert len(tracking_warnings(caplog)) == 1
    assert sync_main([str(out)]) == 0
    assert "uploaded" not in capsys.readouterr().out


def test_sync_never_duplicates_even_if_the_synced_marks_are_lost(store, tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "run"
    with make_tracker(cfg_for(tmp_path, dead, "remark"), out / "stage1", rank=0,
                      stage="stage1") as tracker:
        for step in range(1, 6):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
    journal = out / "stage1" / JOURNAL_NAME
    original = journal.read_text()
    assert sync_main([str(out), "--tracking-uri", store]) == 0
    # A crash right after uploading, before the marks were written: the journal looks unsynced.
    journal.write_text(original)
    (out / "stage1" / "tracking.json").unlink()
    assert sync_main([str(out), "--tracking-uri", store]) == 0
    client = client_for(store)
    exp = client.get_experiment_by_name("remark")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # one stage run + one pipeline run, found again by pcc.run_key
    stage_run = next(r for r in runs if r.data.tags.get("pcc.stage") == "stage1")
    assert steps(client, stage_run.info.run_id, "train/loss") == [1, 2, 3, 4, 5]


def test_hung_server_costs_about_the_http_timeout(tmp_path, caplog):
    # A socket that accepts connections (kernel backlog) but never answers: the worst case.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = cfg_for(tmp_path, uri, "hung")
        started = time.monotonic()
        tracker = make_tracker(cfg, tmp_path / "run", rank=0)
        opened = time.monotonic() - started
        started = time.monotonic()
        for step in range(1, 51):
            tracker.log_metrics({"train/loss": 1.0}, step=step)
        looped = time.monotonic() - started
        tracker.close_journal()  # skip the final attempt (another 2 s)
    assert opened < 8, opened  # one 2 s timeout + MLflow import/setup under CI load
    assert looped < 1.0, looped  # inside the backoff window calls only append to the journal
    assert len(tracking_warnings(caplog)) == 1


def test_sync_without_journal_and_dry_run(tmp_path, capsys):
    assert sync_main([str(tmp_path)]) == 2
    assert "no mlflow_journal.jsonl" in capsys.readouterr().err
    (tmp_path / JOURNAL_NAME).write_text(json.dumps(
        {"v": 1, "id": "a-1", "t": 0, "kind": "metrics", "run": "k", "step": 1,
         "metrics": {"train/loss": 1.0}, "synced": False}) + "\n{torn line")
    assert sync_main([str(tmp_path), "--dry-run"]) == 0
    assert "1 pending record" in capsys.readouterr().out


def test_plot_metrics_from_history_and_journal(store, tmp_path):
    png = plot_metrics({"stage1": {"train/loss": [(1, 1.0), (2, 0.5)]},
                        "stage2": {"train/loss": [(1, 0.4)], "train/pearson_r": [(1, 0.8)]}},
                       tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with make_tracker(cfg_for(tmp_path, store, "plot"), tmp_path / "run", rank=0,
                      stage="stage1") as tracker:
        for step in range(1, 4):
            tracker.log_metrics({"train/loss": 1.0 / step, "train/pearson_r": 0.1 * step,
                                 "eval/stsb_dev_spearman": 0.5}, step=step)
    png = plot_metrics(tmp_path / "run", tmp_path / "b.png")
    assert png.stat().st_size > 1000
    assert plot_metrics({}, tmp_path / "empty.png").is_file()


def test_context_manager_marks_failed_runs(store, tmp_path):
    cfg = cfg_for(tmp_path, store, "failed")
    with pytest.raises(RuntimeError):
        with make_tracker(cfg, tmp_path / "run" / "stage1", rank=0, stage="stage1") as tracker:
            tracker.log_metrics({"train/loss": 1.0}, step=1)
            raise RuntimeError("diverged")
    client = client_for(store)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(tracker.parent.run_id).info.status == "FAILED"
