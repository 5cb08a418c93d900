"""MLflow tracking of the real trainer: ``torchrun --nproc_per_node 2 launchers/train.py``.

A tiny random Llama + LoRA under ZeRO-3 (``launchers/configs/tiny_cpu.yaml``) trains both stages
against a real ``mlflow server`` on 127.0.0.1 (sqlite store in a temporary folder, one server
for the module), and the runs are read back with ``MlflowClient`` (issue 6 acceptance):

1. params, per-step metrics with their step numbers, STS results, artifacts, stage link;
2. SIGKILL of the whole launcher tree, then resume: one MLflow run per stage, every step once;
3. the server SIGKILLed mid-run: training finishes with one warning, records are journaled and
   ``pcc-train sync-mlflow`` uploads them to the restarted server;
4. rank 1 builds no MLflow client and opens no connection to the server, proved by a
   ``sitecustomize`` hook in every process of the launch.

One two-stage run serves 1 and 4. The outage test kills the shared server and restarts it, so
it runs last. Whole file: ~2 minutes on 2 shared CPU cores (four launches, ~30 s each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from _mlflow_server import (
    EVAL_KEY,
    TRAIN_KEYS,
    artifact_paths,
    assert_steps_once,
    free_port,
)

from pcc_dist.tracking import JOURNAL_NAME, read_journal, sync_main

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(360)]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launchers" / "configs" / "tiny_cpu.yaml"
BIN = Path(sys.executable).parent
TIMEOUT = 300
STEPS = 3  # per stage in tiny_cpu.yaml
# Stage 1 (InfoNCE) has no gold scores, hence no batch Pearson r.
STAGE_KEYS = {"stage1": tuple(k for k in TRAIN_KEYS if k != "train/pearson_r"),
              "stage2": TRAIN_KEYS}
TRACKING_WARNING = " WARNING pcc_dist.tracking."

# Loaded by every Python process started with this folder on PYTHONPATH (torchrun and its
# workers). Per RANK it records its start, each MlflowClient it constructs (every MLflow call,
# fluent API included, goes through one), each TCP connection to the tracking server's port,
# and a normal exit. Importing MLflow proves nothing: DeepSpeed itself runs `import mlflow` on
# every rank (deepspeed/autotuning/autotuner.py, 0.19.8).
SITECUSTOMIZE = '''\
import atexit, importlib.machinery, os, socket, sys
_LOG = os.environ["PCC_TEST_CALL_LOG"]
_PORT = int(os.environ["PCC_TEST_MLFLOW_PORT"])
_WHO = os.environ.get("RANK", "launcher")

def _write(text):
    with open(_LOG, "a") as fh:
        fh.write(f"{_WHO} {os.getpid()} {text}\\n")

def _watch(real):
    def connect(self, address):
        if isinstance(address, tuple) and len(address) >= 2 and address[1] == _PORT:
            _write(f"connect {address[0]}:{address[1]}")
        return real(self, address)
    return connect

socket.socket.connect = _watch(socket.socket.connect)
socket.socket.connect_ex = _watch(socket.socket.connect_ex)

class _ClientHook:
    """Wraps MlflowClient.__init__ when mlflow.tracking.client is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "mlflow.tracking.client":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            init = module.MlflowClient.__init__

            def __init__(self, *args, **kwargs):
                _write("MlflowClient")
                init(self, *args, **kwargs)
            module.MlflowClient.__init__ = __init__
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _ClientHook())
_write("start")
atexit.register(_write, "exit")
'''


# --------------------------------------------------------------------------------------------
# Fixtures and helpers.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server.uri)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from helpers.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # One thread per rank: two ranks share the 2 cores. No proxy may answer for 127.0.0.1.
    # PATH is left as the caller has it: the venv's ninja (1.13) and the system's (1.11) hash
    # build commands differently, so a PATH that differs from the rest of the suite's makes
    # DeepSpeed's JIT op (deepspeed_shm_comm) rebuild, ~1 min on 2 cores.
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}
    return env | extra


def _train_cmd(model: Path, out: Path, uri: str, experiment: str, *extra: str) -> list[str]:
    return [str(BIN / "python"), "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "launchers/train.py", "--config", str(CONFIG),
            f"model.name_or_path={model}", f"run.output_dir={out}", "train.log_every_steps=1",
            "tracking.backend=mlflow", f"tracking.tracking_uri={uri}",
            f"tracking.experiment={experiment}", *extra]


def _run(cmd: list[str], log: Path, **env: str) -> str:
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), stdout=handle,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{cmd[:4]} failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def _logged_steps(stage_dir: Path) -> list[int]:
    """Steps in the trainer's metrics.jsonl, in file order (written after the tracker call)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written right now
    return steps


def _losses(stage_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"]
            for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())}


def _run_until(cmd: list[str], log: Path, ready, action, **env: str) -> subprocess.Popen:
    """Start ``cmd``; once ``ready()`` holds call ``action(proc)``; returns the process."""
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                action(proc)
                return proc
            time.sleep(0.02)
    except BaseException:
        _kill_tree(proc)
        raise
    _kill_tree(proc)
    pytest.fail(f"the condition never held while the run was alive:\n"
                f"{log.read_text(errors='replace')[-3000:]}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker. torchrun starts each worker in its own session, so
    the launcher's process group does not contain them."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid)]
        victims += victims[0].children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(victims, timeout=30)


def _runs(client, experiment: str) -> dict[str, object]:
    """``{role: run}`` of an experiment; fails if a role has more than one run (fragments)."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} not on the server"
    runs = client.search_runs([exp.experiment_id])
    roles = Counter(r.data.tags.get("pcc.role") for r in runs)
    assert all(n == 1 for n in roles.values()), f"more than one run per role: {roles}"
    return {r.data.tags["pcc.role"]: r for r in runs}


def _pending(journal: Path) -> list[dict]:
    """Records of a journal that no ``synced``/``rejected`` line has settled."""
    records = read_journal(journal)
    done = {i for r in records if r["kind"] in ("synced", "rejected") for i in r["ids"]}
    return [r for r in records if r.get("synced") is False and r.get("id") not in done]


def _checkpoint_run_id(stage_dir: Path) -> str:
    newest = sorted((stage_dir / "checkpoints").glob("step-*"))[-1]
    return json.loads((newest / "trainer_state.json").read_text())["tracking_run_id"]


def _assert_stage_link(runs: dict) -> None:
    pipeline = runs["pipeline"]
    for stage in ("stage1", "stage2"):
        tags = runs[stage].data.tags
        assert tags["mlflow.parentRunId"] == pipeline.info.run_id, stage
        assert tags["pcc.pipeline_id"] == pipeline.data.tags["pcc.pipeline_id"], stage
        assert tags["pcc.stage"] == stage
    assert all(r.info.status == "FINISHED" for r in runs.values()), \
        {k: r.info.status for k, r in runs.items()}


# --------------------------------------------------------------------------------------------
# 1 + 4: one normal two-stage run with the final STS-B evaluation.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_run(server, tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("normal")
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    calls = tmp / "calls.txt"
    out = tmp / "run"
    log = _run(_train_cmd(tiny_llama, out, server.uri, "two_stage", "eval.tasks=[STSBenchmark]",
                          "eval.dev=true"),
               tmp / "log.txt", PCC_TEST_CALL_LOG=str(calls),
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
               PCC_TEST_MLFLOW_PORT=str(server.port))
    return SimpleNamespace(out=out, log=log, calls=calls, port=server.port,
                           experiment="two_stage")


def test_two_stage_run_is_recorded_with_params_steps_sts_artifacts_and_stage_link(
        normal_run, client, tiny_llama, tmp_path):
    out = normal_run.out
    runs = _runs(client, normal_run.experiment)
    assert set(runs) == {"pipeline", "stage1", "stage2"}
    _assert_stage_link(runs)
    pipeline = runs["pipeline"]
    assert pipeline.info.run_name == "tiny_cpu"
    assert TRACKING_WARNING not in normal_run.log

    for stage in ("stage1", "stage2"):
        run = runs[stage]
        run_id = run.info.run_id
        assert run.info.run_name == f"tiny_cpu-{stage}"
        # The checkpoint holds the run id a resume re-attaches to.
        assert _checkpoint_run_id(out / stage) == run_id
        # Params: the flattened resolved config and the DeepSpeed config the engine built.
        params = run.data.params
        assert params["stage2.lr"] == "0.001" and params["stage1.max_steps"] == str(STEPS)
        assert params["model.name_or_path"] == str(tiny_llama)
        assert params["tracking.experiment"] == normal_run.experiment
        assert params["deepspeed.zero_optimization.stage"] == "3"
        assert params["deepspeed.train_batch_size"] == "8"
        assert "deepspeed.gradient_clipping" in params
        tags = run.data.tags
        assert tags["pcc.world_size"] == "2" and tags["pcc.nodes"] == "1"
        assert tags["pcc.version.mlflow"] == "3.17.2"
        # Metrics: every key at steps 1..N exactly once, and the values the trainer computed.
        assert_steps_once(client, run_id, STAGE_KEYS[stage], range(1, STEPS + 1))
        local = _losses(out / stage)
        remote = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
        assert remote == pytest.approx(local, rel=1e-6)
        lr = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr")}
        assert lr[1] == pytest.approx(1e-3) and lr[STEPS] < lr[1]  # warm-up 1, linear decay
        # STS-B dev at the end of the stage, at the stage's last step.
        assert_steps_once(client, run_id, [EVAL_KEY], [STEPS])
        outcome = json.loads((out / stage / "outcome.json").read_text())
        assert run.data.metrics[EVAL_KEY] == pytest.approx(outcome["stsb_dev_spearman"])
        assert artifact_paths(client, run_id) >= {"config/config.yaml", "plots/metrics.png"}
    assert "train/pearson_r" not in runs["stage1"].data.metrics

    # The pipeline run: config params, final STS results and the results document.
    assert pipeline.data.params["stage2.lr"] == "0.001"
    results = json.loads((out / "results.json").read_text())
    spearman = results["sts"]["spearman"]
    assert set(spearman) == {"STSBenchmark"}
    metrics = pipeline.data.metrics
    assert metrics["eval/sts/STSBenchmark"] == pytest.approx(spearman["STSBenchmark"])
    assert metrics["eval/sts/avg"] == pytest.approx(results["sts"]["avg"])
    assert_steps_once(client, pipeline.info.run_id, ["eval/sts/STSBenchmark", "eval/sts/avg"],
                      [0])
    assert artifact_paths(client, pipeline.info.run_id) >= {"config/config.yaml",
                                                             "eval/results.json"}

    # Artifacts read back: the very results document, a real PNG, the resolved config.
    got = Path(client.download_artifacts(pipeline.info.run_id, "eval/results.json",
                                         str(tmp_path)))
    assert json.loads(got.read_text()) == results
    png = Path(client.download_artifacts(runs["stage2"].info.run_id, "plots/metrics.png",
                                         str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    config = Path(client.download_artifacts(runs["stage1"].info.run_id, "config/config.yaml",
                                            str(tmp_path)))
    assert f"name_or_path: {tiny_llama}" in config.read_text()


def test_nonzero_rank_makes_no_mlflow_call(normal_run, client):
    by_rank: dict[str, list[str]] = {}
    for line in normal_run.calls.read_text().splitlines():
        who, _pid, what = line.split(" ", 2)
        by_rank.setdefault(who, []).append(what)
    # The hook ran in both workers and both exited normally; rank 1 built no MLflow client and
    # opened no connection to the server.
    assert by_rank.get("1") == ["start", "exit"], by_rank.get("1")
    # Positive control: the same hooks see rank 0 build clients and connect to the server.
    rank0 = Counter(by_rank.get("0", []))
    assert rank0["start"] == 1 and rank0["exit"] == 1 and rank0["MlflowClient"] >= 1, rank0
    assert rank0[f"connect 127.0.0.1:{normal_run.port}"] >= 1, rank0
    # The launcher does not track either.
    assert by_rank.get("launcher") == ["start", "exit"], by_rank.get("launcher")


# --------------------------------------------------------------------------------------------
# 2: SIGKILL of the launcher and all ranks, then resume into the same MLflow run.
# --------------------------------------------------------------------------------------------


# slow: test_mlflow_server.py's test_killed_trainer_resumes_same_run_without_duplicate_or_
# missing_steps checks the same re-attach against a real server in the default suite (stand-in
# training loop).
@pytest.mark.slow
def test_sigkill_and_resume_continue_the_same_run_without_duplicate_or_missing_steps(
        server, client, tiny_llama, tmp_path):
    out = tmp_path / "run"
    stage_dir = out / "stage2"
    cmd = _train_cmd(tiny_llama, out, server.uri, "kill_resume", "stage1.enabled=false",
                     "stage2.max_steps=6", "checkpoint.every_steps=2", "eval.tasks=[]",
                     "eval.dev=false")
    # Step 3 is in metrics.jsonl only after the tracker call for it returned: it is on the
    # server. The newest checkpoint is step 2, so the resumed run replays step 3.
    proc = _run_until(cmd, tmp_path / "killed.txt", lambda: 3 in _logged_steps(stage_dir),
                      _kill_tree)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_logged_steps(stage_dir))
    assert killed_at < 6, "the run finished before it could be killed"
    runs = _runs(client, "kill_resume")
    run_id = runs["stage2"].info.run_id
    assert runs["stage2"].info.status == "RUNNING"  # nobody ended it: the process died
    assert_steps_once(client, run_id, STAGE_KEYS["stage2"], range(1, killed_at + 1))
    saved = _checkpoint_run_id(stage_dir)
    assert saved == run_id

    resumed = _run(cmd, tmp_path / "resumed.txt")
    assert "resumed from" in resumed
    steps = _logged_steps(stage_dir)
    assert sorted(set(steps)) == list(range(1, 7))
    replayed = sorted(s for s, n in Counter(steps).items() if n > 1)
    assert replayed, "no step was replayed after the kill: the test proves nothing"

    runs = _runs(client, "kill_resume")  # still one stage-2 run and one pipeline run
    assert set(runs) == {"pipeline", "stage2"}
    assert runs["stage2"].info.run_id == run_id == _checkpoint_run_id(stage_dir)
    assert runs["stage2"].info.status == "FINISHED"
    assert runs["stage2"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert_steps_once(client, run_id, STAGE_KEYS["stage2"], range(1, 7))
    # Steps logged after the resume carry the resumed run's values.
    local = _losses(stage_dir)
    remote = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    for step in range(killed_at + 1, 7):
        assert remote[step] == pytest.approx(local[step], rel=1e-6)


# --------------------------------------------------------------------------------------------
# 3: the server dies mid-run; the journal and `pcc-train sync-mlflow` (runs last: it kills the
#    module's server and starts it again).
# --------------------------------------------------------------------------------------------


# slow: test_mlflow_server.py's test_server_killed_mid_run_then_sync_uploads_everything_once
# checks the outage journal and its sync against a real server in the default suite.
@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_then_sync_uploads_the_journal(
        server, client, tiny_llama, tmp_path):
    out = tmp_path / "run"
    experiment = "outage"
    cmd = _train_cmd(tiny_llama, out, server.uri, experiment, "eval.tasks=[]", "eval.dev=false")
    # Kill the server once stage 1 step 1 is on it; everything after goes to the journal.
    proc = _run_until(cmd, tmp_path / "log.txt", lambda: 1 in _logged_steps(out / "stage1"),
                      lambda _proc: server.kill())
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    log = (tmp_path / "log.txt").read_text(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    for stage in ("stage1", "stage2"):
        assert sorted(set(_logged_steps(out / stage))) == list(range(1, STEPS + 1))

    # One warning for the whole outage (both stages and the pipeline run), naming the server
    # and the way to upload later.
    warnings = [line for line in log.splitlines() if TRACKING_WARNING in line]
    assert len(warnings) == 1, warnings
    assert server.uri in warnings[0] and "sync-mlflow" in warnings[0]

    # Journaled: stage 1 from step 2 on (step 1 reached the server), all of stage 2.
    pending_steps = {}
    for stage in ("stage1", "stage2"):
        pending = _pending(out / stage / JOURNAL_NAME)
        pending_steps[stage] = sorted({r["step"] for r in pending if r["kind"] == "metrics"})
    assert pending_steps["stage2"] == list(range(1, STEPS + 1))
    assert pending_steps["stage1"] and set(pending_steps["stage1"]) <= set(range(2, STEPS + 1))
    assert _pending(out / JOURNAL_NAME), "the pipeline run's results were not journaled"
    stage2_key = _checkpoint_run_id(out / "stage2")
    assert stage2_key.startswith("local-")  # stage 2 never reached the server

    server.start()  # same port, same sqlite store
    journals = (out / JOURNAL_NAME, out / "stage1" / JOURNAL_NAME, out / "stage2" / JOURNAL_NAME)
    done = subprocess.run([str(BIN / "pcc-train"), "sync-mlflow", str(out), "--tracking-uri",
                           server.uri], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(_pending(journal) == [] for journal in journals)
    # Again (in-process, to save a start-up): nothing to do, nothing duplicated (checked below).
    assert sync_main([str(out), "--tracking-uri", server.uri]) == 0

    runs = _runs(client, experiment)
    assert set(runs) == {"pipeline", "stage1", "stage2"}
    _assert_stage_link(runs)
    for stage in ("stage1", "stage2"):
        run_id = runs[stage].info.run_id
        assert_steps_once(client, run_id, STAGE_KEYS[stage], range(1, STEPS + 1))
        local = _losses(out / stage)
        remote = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
        assert remote == pytest.approx(local, rel=1e-6)
        assert runs[stage].data.params["deepspeed.zero_optimization.stage"] == "3"
        assert artifact_paths(client, run_id) >= {"config/config.yaml", "plots/metrics.png"}
    assert "eval/results.json" in artifact_paths(client, runs["pipeline"].info.run_id)
    # The offline stage-2 run got an id on sync; the folder maps the checkpoint's key to it.
    state = json.loads((out / "stage2" / "tracking.json").read_text())
    assert state["runs"]["stage2"]["run_id"] == runs["stage2"].info.run_id
    assert f"local-{state['runs']['stage2']['run_key']}" == stage2_key
