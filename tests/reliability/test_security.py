"""Security defaults (issue #7): no pickle execution, no remote code, no leaked secrets, loopback.

* Every ``torch.load`` in the product passes ``weights_only=True`` (an AST scan of ``pcc_dist/``,
  ``kernels/`` and ``launchers/``), and a checkpoint whose state file carries a malicious pickle
  is refused at load without running it.
* ``trust_remote_code`` is False unless the config turns it on; the kwargs that reach
  transformers' ``from_pretrained`` say so.
* Secrets from the environment (and planted in config values) never reach MLflow params, tags,
  run names, artifacts, the store's bytes, the run folder or the log.
* The MLflow server the project starts or documents binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import save_tiny_model

from pcc_dist.checkpoint import (
    COMPLETE_MARKER,
    STATE_FILE,
    CheckpointError,
    TrainerState,
)
from pcc_dist.checkpoint_manager import CheckpointManager
from pcc_dist.config import PccConfig, load_config
from pcc_dist.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
PRODUCT_DIRS = ("pcc_dist", "kernels", "launchers")


def product_sources() -> list[Path]:
    files = [p for d in PRODUCT_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, files  # the scan must actually see the package
    return files


# --------------------------------------------------------------------------------------------
# (a) Deserialisation: weights_only everywhere, and a malicious pickle is refused.
# --------------------------------------------------------------------------------------------

# Calls that unpickle arbitrary objects; none belongs in the product.
_PICKLE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                 ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("marshal", "loads"),
                 ("cloudpickle", "load"), ("cloudpickle", "loads"), ("shelve", "open")}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Deserialisation and remote-code hazards in one module's source.

    Flags: ``torch.load`` (under any import alias) without ``weights_only=True``; pickle-family
    loaders; ``numpy.load(allow_pickle=True)``; ``yaml.load`` / ``yaml.unsafe_load`` unless the
    loader is a ``SafeLoader`` (or a class of this module subclassing it); any literal
    ``trust_remote_code=True``.
    """
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> qualified ("L" -> "torch.load", "th" -> "torch")
    safe_loaders = {"yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                    a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_dotted(b) in safe_loaders for b in node.bases):
            safe_loaders.add(node.name)
    found = []
    for node in ast.walk(tree):
        # {"trust_remote_code": True} and kwargs["trust_remote_code"] = True, the two ways a
        # kwargs dict for from_pretrained gets built.
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and \
                        _is_true(value):
                    found.append(f"{filename}:{node.lineno}: trust_remote_code=True hard-coded")
        if isinstance(node, ast.Assign) and _is_true(node.value) and any(
                isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                and t.slice.value == "trust_remote_code" for t in node.targets):
            found.append(f"{filename}:{node.lineno}: trust_remote_code=True hard-coded")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        qualified = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{node.lineno}"
        if qualified in ("torch.load", "torch.serialization.load") and \
                not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: {name}(...) without weights_only=True")
        if tuple(qualified.rsplit(".", 1)) in _PICKLE_CALLS:
            found.append(f"{where}: {name}(...) unpickles arbitrary objects")
        if qualified == "numpy.load" and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{where}: numpy.load(allow_pickle=True)")
        if qualified in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{where}: {name}(...) is not a safe YAML load")
        if qualified == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader) not in safe_loaders:
                found.append(f"{where}: yaml.load(...) without a SafeLoader")
        if _is_true(_kw(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True hard-coded")
    return found


def test_scanner_flags_each_hazard():
    # Negative control: a scanner that flags nothing would pass the product scan vacuously.
    bad = """
import torch, pickle, yaml, numpy as np
import torch as th
from torch import load as tl
from transformers import AutoModel
class Mine(yaml.Loader): pass
torch.load("a")
torch.load("a", weights_only=False)
th.load("a", map_location="cpu")
tl("a")
pickle.loads(b"")
np.load("a", allow_pickle=True)
yaml.load("a: 1", Loader=Mine)
yaml.unsafe_load("a")
AutoModel.from_pretrained("x", trust_remote_code=True)
kwargs = {"dtype": None, "trust_remote_code": True}
kwargs["trust_remote_code"] = True
"""
    assert len(unsafe_calls(bad)) == 11, unsafe_calls(bad)
    good = """
import torch, yaml
class L(yaml.SafeLoader): pass
torch.load("a", weights_only=True)
yaml.load("a", Loader=L)
yaml.safe_load("a")
kwargs = {"trust_remote_code": s.trust_remote_code}
"""
    assert unsafe_calls(good) == []


def test_product_has_no_unsafe_deserialisation_or_remote_code():
    found = [hit for path in product_sources()
             for hit in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == []


class _Armed:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code an attacker wants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _FakeEngine:
    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)

    def load_checkpoint(self, folder: Path) -> None:
        pass


def _planted_checkpoint(root: Path, marker: Path) -> Path:
    """A complete checkpoint folder whose RNG state file is a malicious pickle."""
    manager = CheckpointManager(root / "checkpoints", keep_last=2, rank=0, barrier=lambda: None)
    path = manager.save(_FakeEngine(), TrainerState(stage="stage2", step=3))
    assert (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()
    torch.save({"torch": torch.get_rng_state(), "python": _Armed(marker)},
               path / "rng_rank0.pt")
    return path


def test_malicious_pickle_in_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    path = _planted_checkpoint(tmp_path, marker)
    manager = CheckpointManager(path.parent, keep_last=2, rank=0, barrier=lambda: None)
    # Refused by the integrity check before the resume (weights_only loading of the RNG file),
    # as a damaged checkpoint: nothing of it is restored, nothing of it runs.
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt cannot be read as RNG states "
                                              r"\(UnpicklingError: Weights only load failed"):
        manager.load(_FakeEngine(), path)
    assert not marker.exists(), "loading a checkpoint executed code from it"


def test_malicious_pickle_payload_is_armed(tmp_path):
    # Negative control: the same file does run its payload when unpickled without
    # weights_only, so the refusal above is the loader's doing, not a dud payload.
    marker = tmp_path / "PWNED"
    path = _planted_checkpoint(tmp_path, marker)
    torch.load(path / "rng_rank0.pt", weights_only=False)
    assert marker.exists()


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    # DeepSpeed's own engine unpickles with weights_only=False; TrainEngine.load_checkpoint runs
    # it under weights_only_engine_loads. Its torch checkpoint engine is the real one, so the test
    # breaks if DeepSpeed's load signature changes or our wrapper stops applying.
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pcc_dist.safe_loading import weights_only_engine_loads

    marker = tmp_path / "PWNED"
    torch.save({"module": {"w": torch.ones(2)}, "payload": _Armed(marker)}, tmp_path / "bad.pt")
    clean = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
             "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(3)}}}}
    torch.save(clean, tmp_path / "clean.pt")
    engine = TorchCheckpointEngine()
    with weights_only_engine_loads(engine):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            engine.load(str(tmp_path / "bad.pt"), map_location="cpu")
        assert engine.load(str(tmp_path / "clean.pt"))["zero_stage"] == ZeroStageEnum.weights
    assert not marker.exists(), "loading a DeepSpeed checkpoint executed code from it"
    # Negative control: outside the wrapper DeepSpeed's own load runs the payload.
    engine.load(str(tmp_path / "bad.pt"), map_location="cpu")
    assert marker.exists()


def test_universal_conversion_reads_deepspeed_files_weights_only(tmp_path):
    # Resuming on another world size without a portable copy runs DeepSpeed's converter
    # (ds_to_universal), which unpickles every shard with weights_only=False; ours runs it under
    # a weights-only torch.load. The converter is the real one, so the test breaks if it starts
    # reading through something our wrapper does not cover.
    from deepspeed.checkpoint import ds_to_universal

    from pcc_dist.universal_checkpoint import convert

    marker = tmp_path / "PWNED"
    state = tmp_path / "checkpoints" / "step-00000002" / "engine" / "state"
    state.mkdir(parents=True)
    optim = state / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 3}, "payload": _Armed(marker)}, optim)
    with pytest.raises(CheckpointError,
                       match=r"(?s)converting .*step-00000002/engine/state to a universal "
                             r"checkpoint .* failed: UnpicklingError: Weights only load failed"):
        convert(state, state.parent / "universal")
    assert not marker.exists(), "converting a DeepSpeed checkpoint executed code from it"
    # Nothing half-converted is left, inside the checkpoint or beside it.
    assert not (state.parent / "universal").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    # Negative control: DeepSpeed's own reader runs the payload.
    ds_to_universal._get_zero_stage([str(optim)])
    assert marker.exists()



def test_universal_reader_allows_what_zero_1_2_files_hold(tmp_path):
    # ZeRO-1/2 optimizer files map each parameter to its slice with DeepSpeed's fragment_address
    # (two ints); the weights-only reader must allow it or no ZeRO-1/2 checkpoint converts.
    from deepspeed.utils.tensor_fragment import fragment_address

    from pcc_dist.safe_loading import weights_only_load

    path = tmp_path / "optim.pt"
    torch.save({"param_slice_mappings": [{"w": fragment_address(numel=6, start=2)}]}, path)
    assert weights_only_load(path)["param_slice_mappings"][0]["w"] == fragment_address(6, 2)
    # Negative control: torch's default allowlist refuses it.
    with pytest.raises(pickle.UnpicklingError, match="fragment_address"):
        torch.load(path, weights_only=True)


def test_clean_checkpoint_still_loads(tmp_path):
    # Negative control: weights_only must not refuse what the trainer itself writes.
    manager = CheckpointManager(tmp_path / "ck", keep_last=2, rank=0, barrier=lambda: None)
    path = manager.save(_FakeEngine(), TrainerState(stage="stage1", step=7))
    assert manager.load(_FakeEngine(), path).step == 7


# --------------------------------------------------------------------------------------------
# (b) trust_remote_code: False by default, True only when the config says so.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bert") / "bert", "bert")


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Records the kwargs of every transformers ``from_pretrained`` the model loader makes."""
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls_name in ("AutoConfig", "AutoModel", "AutoTokenizer"):
        cls = getattr(transformers, cls_name)
        original = cls.from_pretrained.__func__

        def recorder(klass, *args, _original=original, _name=cls_name, **kwargs):
            calls.append((_name, dict(kwargs)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recorder))
    return calls


@pytest.mark.parametrize("overrides,expected", [
    ([], False),
    (["model.trust_remote_code=true"], True),
])
def test_trust_remote_code_reaches_from_pretrained_only_when_configured(
        tiny_bert_dir, from_pretrained_calls, overrides, expected):
    from pcc_dist.modeling import load_embedder

    assert PccConfig().model.trust_remote_code is False
    cfg = load_config(None, [f"model.name_or_path={tiny_bert_dir}", "model.kind=encoder",
                             *overrides])
    load_embedder(cfg.model)
    names = {name for name, _ in from_pretrained_calls}
    assert names == {"AutoConfig", "AutoModel", "AutoTokenizer"}, from_pretrained_calls
    for name, kwargs in from_pretrained_calls:
        # Explicit, not left to transformers' default: a future default change cannot flip it.
        assert kwargs.get("trust_remote_code", "absent") is expected, (name, kwargs)


# --------------------------------------------------------------------------------------------
# (c) Secrets never reach MLflow.
# --------------------------------------------------------------------------------------------

SECRET_ENV = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY",
              "PCC_SERVICE_TOKEN", "MY_DB_KEY", "ORG_WEBHOOK_SECRET", "PG_PASSWORD")


@pytest.fixture(scope="module")
def store(sqlite_mlflow_store):
    """``(folder, uri)`` of the module's sqlite store (tests/conftest.py)."""
    return sqlite_mlflow_store


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def test_env_and_config_secrets_never_reach_mlflow(store, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from pcc_dist.tracking import make_tracker

    folder, uri = store
    # Random, token-free shapes: only the environment says these are secrets.
    secrets = {name: f"v{uuid.uuid4().hex[:6]}-{name.lower()}-{uuid.uuid4().hex[:10]}"
               for name in SECRET_ENV}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    hf, aws = secrets["HF_TOKEN"], secrets["AWS_SECRET_ACCESS_KEY"]
    # A user who pastes a token into config values (paths, the run name, a data id).
    cfg = load_config(None, [
        f"run.output_dir={tmp_path / 'run'}", f"tracking.tracking_uri={uri}",
        f"tracking.experiment=exp-{secrets['ORG_WEBHOOK_SECRET']}", f"run.name=run-{hf}",
        f"data.root=/data/{aws}", f"stage2.data=/data/{secrets['PG_PASSWORD']}/train.jsonl",
        f"model.name_or_path=/models/{secrets['WANDB_API_KEY']}"])
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"hub_token": hf, "note": f"key {secrets['MY_DB_KEY']}",
                                   "spearman": 0.8}))
    caplog.set_level(logging.DEBUG, logger="pcc_dist")

    tracker = make_tracker(cfg, tmp_path / "run" / "stage2", rank=0, stage="stage2")
    tracker.log_params({"deepspeed": {"auth": {"password": secrets["PG_PASSWORD"]},
                                      "wandb": secrets["WANDB_API_KEY"]},
                        "hub_url": f"https://user:{secrets['PCC_SERVICE_TOKEN']}@hub.example"})
    tracker.set_tags({"note": f"made with {secrets['ORG_WEBHOOK_SECRET']}",
                      "mlflow_auth": secrets["MLFLOW_TRACKING_PASSWORD"]})
    for step in (1, 2):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.log_artifact(results, "eval")
    run_id, parent_id = tracker.run_id, tracker.parent.run_id
    tracker.close()

    client = MlflowClient(uri)
    runs = [client.get_run(r) for r in (run_id, parent_id)]
    assert not any(r.startswith("local-") for r in (run_id, parent_id)), "never reached MLflow"
    assert runs[0].data.params["data.root"] == "***"  # the config value did arrive, redacted
    assert "eval" in {a.path for a in client.list_artifacts(run_id)}
    experiment = client.get_experiment(runs[0].info.experiment_id).name
    logged = json.dumps([experiment] + [[r.info.run_name, r.data.params, r.data.tags]
                                        for r in runs])
    downloads = []
    for r in (run_id, parent_id):
        target = tmp_path / "dl" / r
        target.mkdir(parents=True)
        downloads += _all_bytes(Path(client.download_artifacts(r, "", str(target))))
    assert len(downloads) >= 3, downloads  # config of each run + results.json at least
    everything = [(Path("<params/tags/run names>"), logged.encode())] + downloads \
        + _all_bytes(folder) + _all_bytes(tmp_path / "run")
    for name, value in secrets.items():
        forms = {value.encode(), value.encode("utf-16-le")}
        for path, data in everything:
            assert not any(f in data for f in forms), f"{name} leaked into {path}"
        assert value not in caplog.text, f"{name} leaked into the log"


# --------------------------------------------------------------------------------------------
# (d) The MLflow server binds to loopback unless told otherwise.
# --------------------------------------------------------------------------------------------

_MLFLOW_COMMAND = re.compile(r"mlflow\s+(ui|server)\b[^\n`\"]*")


def _documented_commands() -> list[tuple[str, str]]:
    """Every ``mlflow ui|server`` command in the README, Makefile, launchers and the package."""
    sources = [REPO / "README.md", REPO / "Makefile", *product_sources()]
    return [(str(p.relative_to(REPO)), m.group(0)) for p in sources if p.is_file()
            for m in _MLFLOW_COMMAND.finditer(p.read_text(encoding="utf-8"))]


def test_documented_mlflow_commands_bind_to_loopback():
    from mlflow.cli import cli

    commands = _documented_commands()
    assert any(p == "README.md" for p, _ in commands), commands  # the UI command users run
    for path, command in commands:
        host = re.search(r"(?:--host|-h)[ =](\S+)", command)
        if host:
            assert host.group(1) in ("127.0.0.1", "localhost"), (path, command)
        else:  # no --host: MLflow's own default decides, and it must be loopback
            sub = command.split()[1]
            option = next(p for p in cli.commands["server"].params if p.name == "host") \
                if sub == "server" else next(p for p in cli.get_command(None, sub).params
                                             if p.name == "host")
            assert option.default == "127.0.0.1", (path, command, option.default)
    for path in [REPO / "README.md", REPO / "Makefile", *product_sources()]:
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not ("mlflow" in line.lower() and "0.0.0.0" in line), (path, line)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of LISTEN sockets on ``port`` from /proc/net/tcp{,6} (hex, as the kernel
    writes them: 0100007F is 127.0.0.1, 00000000 is 0.0.0.0)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = TCP_LISTEN
                found.add(address)
    return found


SERVER_SCRIPT = REPO / "launchers" / "mlflow_server.sh"


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
@pytest.mark.parametrize(("host", "expected"), [(None, "0100007F"), ("0.0.0.0", "00000000")])
def test_server_script_listens_on_loopback_unless_told_otherwise(tmp_path, host, expected):
    """``launchers/mlflow_server.sh`` started for real: 127.0.0.1 (0100007F) by default, all
    interfaces (00000000) only when PCC_MLFLOW_HOST says so."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PCC_MLFLOW_"))}
    env |= {"PCC_MLFLOW_PORT": str(port), "PCC_MLFLOW_STORE": f"sqlite:///{tmp_path}/m.db",
            "PCC_MLFLOW_ARTIFACTS": str(tmp_path / "artifacts"),
            "PYTHON": sys.executable, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if host is not None:
        env["PCC_MLFLOW_HOST"] = host
    log = tmp_path / "server.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(["bash", str(SERVER_SCRIPT), "--workers", "1"], env=env,
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (addresses := _listening_addresses(port)) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert addresses == {expected}, (addresses, log.read_text()[-2000:])
    assert f"mlflow server: http://{host or '127.0.0.1'}:{port}" in log.read_text()
