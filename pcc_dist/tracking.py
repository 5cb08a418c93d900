"""Experiment tracking: MLflow on rank 0, a null tracker everywhere else.

:func:`make_tracker` is the only constructor the trainer needs. On ranks other than 0, and when
``tracking.backend == "none"``, it returns a :class:`NullTracker`, which never imports MLflow, so
those processes never open a connection to the tracking server. On rank 0 it returns an
:class:`MlflowTracker`, which talks to MLflow through ``MlflowClient`` only (no fluent
``mlflow.start_run`` global state).

What a run records:
    * params: the flattened resolved config (``stage2.lr`` ...), plus whatever the trainer passes
      (nested dicts such as the DeepSpeed config are flattened to dotted keys), each value passed
      through :func:`redact` and cut to MLflow's 6000-character limit;
    * tags: :func:`environment_tags` (package versions, world size, nodes, git commit, host),
      ``pcc.stage``, ``pcc.pipeline_id``, ``pcc.run_key``;
    * metrics with explicit steps; a step at or below the last step already logged for the same
      key is skipped, so a resumed run that replays steps cannot duplicate them;
    * artifacts: the resolved config (``config/config.yaml``), anything the trainer logs, and at
      :meth:`MlflowTracker.close` a loss / Pearson r plot (``plots/metrics.png``).

Stage link (the two-stage story):
    Each run folder ``cfg.run.output_dir`` is one *pipeline*. ``make_tracker(stage="stage1")``
    (or ``"stage2"``) opens a child run nested under a pipeline parent run (MLflow tag
    ``mlflow.parentRunId``, shown as a tree in the UI); parent and children also share the tag
    ``pcc.pipeline_id`` for search. The parent is found in ``<output_dir>/tracking.json`` and
    created on first use; a fresh (not resumed) ``stage1`` starts a new pipeline, every other
    call joins the folder's pipeline. ``make_tracker(stage=None)`` returns the pipeline run
    itself (for the final STS7 scores). An explicit ``parent_run_id`` overrides all of this.

Resume:
    :attr:`MlflowTracker.run_id` goes into the checkpoint; ``make_tracker(resume_run_id=...)``
    re-attaches to that run (status back to RUNNING), skips params already logged with the same
    value (MLflow params are immutable; a changed value is kept as tag
    ``pcc.param_changed.<key>``) and continues metrics after the last logged step. While a run
    has not reached the server yet, ``run_id`` is ``local-<key>``; it is accepted as
    ``resume_run_id`` too.

Outage:
    Every record (run start/end, params, tags, metrics, artifact paths) is appended to the
    journal ``<run_dir>/mlflow_journal.jsonl``, one JSON object per line. When a call to MLflow
    fails for any reason other than MLflow rejecting the record itself, the tracker logs ONE
    warning naming the URI and the journal, marks the record pending and keeps going; the
    training loop never sees an exception. Pending records are retried in order with
    exponential backoff (5 s, 10 s, ... capped at 300 s); between attempts a call costs only a
    journal append. MLflow's own HTTP client would retry 7 times over ~4 minutes and wait 120 s
    per request, so our calls run with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=2``: a dead server costs at most ~2 s per attempt.
    The warning is given once per tracking URI and pipeline folder in a process, even though
    each stage opens its own journal. A stage that starts (or ends) while MLflow answers also
    uploads what earlier stage folders of the pipeline left pending.
    ``pcc-train sync-mlflow RUN_DIR`` (:func:`sync_main`) uploads journals later; it is
    idempotent (metric steps at or below the server's last step are skipped, params compared,
    runs found again by their ``pcc.run_key`` tag) and marks what it uploaded.

Journal format (version 1), one JSON object per line:
    ``{"v": 1, "id": "<session>-<n>", "kind": K, "run": RUN_KEY, "t": epoch_ms,
    "synced": bool, ...}`` with ``K`` one of ``start`` (experiment, name, tags, parent),
    ``params``, ``tags``, ``metrics`` (``step``, ``metrics``), ``artifact`` (``path`` relative to
    the journal's folder when inside it, ``artifact_path``) and ``end`` (``status``).
    Bookkeeping lines: ``created`` (``run`` -> ``run_id``), ``synced`` and ``rejected``
    (``ids`` of records that are done). A record is pending when ``synced`` is false and no
    ``synced``/``rejected`` line lists its id.

Environment knobs (seconds): ``PCC_MLFLOW_RETRY_S`` (first retry, 5), ``PCC_MLFLOW_RETRY_MAX_S``
(cap, 300), ``PCC_MLFLOW_HTTP_TIMEOUT_S`` (per request, 2), ``PCC_GIT_COMMIT`` (commit tag when the
package is not a git checkout).

The tracker is not thread-safe: call it from the training loop's thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; sync-mlflow then trusts the user.
    fcntl = None

if TYPE_CHECKING:
    from pcc_dist.config import PccConfig

logger = logging.getLogger(__name__)

MLFLOW_PIN = "mlflow==3.17.2"
JOURNAL_NAME = "mlflow_journal.jsonl"
STATE_NAME = "tracking.json"
LOCK_NAME = ".mlflow_journal.lock"
PRIVATE_DIR = ".tracking"
PLOT_NAME = "metrics.png"
REDACTED = "***"
JOURNAL_VERSION = 1

# Limits of MLflow 3.17 (mlflow/utils/validation.py); copied so that NullTracker code paths and
# the journal never import MLflow. We cut values ourselves so the journal holds exactly what the
# server stores, which keeps the "same value already logged" comparison on resume exact.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
# MLflow names: alphanumerics, _ - . space / and : (validate_param_and_metric_name, non-Windows).
_VALID_NAME = re.compile(r"^[/\w.\- :]+$")

# MLflow error codes that mean "this record is invalid", as opposed to "the server is down":
# retrying such a record would block the journal forever, so it is dropped with a warning.
_REJECTED_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST",
})

# (tracking URI, pipeline folder) pairs this process has already warned about: one warning per
# outage story, even though each stage opens its own session.
_WARNED: set[tuple[str, str]] = set()

ENV_TAG_PACKAGES = ("pcc-dist", "torch", "deepspeed", "transformers", "peft", "bitsandbytes",
                    "mlflow")


# --------------------------------------------------------------------------------------------
# Secrets: nothing that looks like a credential reaches params, tags, artifacts or the journal.
# --------------------------------------------------------------------------------------------

_SECRET_ENV_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|^AWS_", re.IGNORECASE)
# Last component of a param/tag key that names a credential ("hub.token", "db_password");
# "max_tokens" and "tokenizer" do not match.
_SECRET_KEY_NAME = re.compile(
    r"(?:^|[._-])(?:token|secret|password|passwd|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"private[_-]?key|credentials?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{30,}"                        # Hugging Face access token
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                 # AWS access key id
    r"|sk-[A-Za-z0-9_-]{20,}"                     # OpenAI-style API key
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"              # Slack token
    r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"  # JWT
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)")
# Values of secret-named env vars shorter than this are not treated as secrets: "1", "true" or
# "en" would otherwise redact ordinary params; real tokens are 20-100 characters.
_MIN_SECRET_LEN = 6
# Text artifacts larger than this are uploaded unscanned (model weights, big tokenizer files).
_MAX_SCAN_BYTES = 5 * 1024 * 1024


def _env_secrets() -> list[str]:
    """Values of env vars whose name looks secret, longest first (so substrings go last)."""
    values = {v for k, v in os.environ.items()
              if _SECRET_ENV_NAME.search(k) and len(v.strip()) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """Replace secrets inside free text (config files, messages) with ``***``.

    Args:
        text: Any text.
        secrets: Env secret values; None reads the environment now.

    Returns:
        ``text`` with every secret env value, every token-shaped string and every URL password
        replaced by ``***``.
    """
    for secret in _env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    text = _SECRET_VALUE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


def _redact_value(key: str, value: Any, secrets: list[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact_value(f"{key}.{k}", v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(key, v, secrets) for v in value)
    if not isinstance(value, str):
        return REDACTED if str(value) in secrets else value
    if value and _SECRET_KEY_NAME.search(key):
        return REDACTED
    if any(s in value for s in secrets) or _SECRET_VALUE.search(value):
        return REDACTED
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, value)


def redact(params: dict) -> dict:
    """Params with every secret-looking value replaced by ``***``.

    A value is replaced when it equals or contains the value of an env var whose name looks
    secret (``TOKEN``, ``KEY``, ``SECRET``, ``PASSWORD``, ``CREDENTIAL``, ``AWS_*``; values of at
    least 6 characters), when it has the shape of a known token (``hf_…``, ``ghp_…``,
    ``AKIA…``, ``sk-…``, JWT, private key), or when its key names a credential (``hub.token``,
    ``db_password``). The password inside a URL (``https://user:pw@host``) is replaced in place.
    Nested mappings and lists are redacted recursively; the input is not modified.

    Args:
        params: Flat or nested mapping of names to values.

    Returns:
        A new mapping of the same shape.
    """
    secrets = _env_secrets()
    return {k: _redact_value(str(k), v, secrets) for k, v in params.items()}


def _safe_uri(uri: str | None) -> str:
    return redact_text(uri) if uri else "<MLflow default>"


def _short_error(exc: BaseException, limit: int = 240) -> str:
    text = redact_text(f"{type(exc).__name__}: {exc}".replace("\n", " "))
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# Environment tags.
# --------------------------------------------------------------------------------------------


def _git_commit() -> tuple[str, str]:
    """(commit, dirty) of the checkout holding this package; ("unknown", "unknown") if none."""
    if os.environ.get("PCC_GIT_COMMIT"):
        return os.environ["PCC_GIT_COMMIT"], "unknown"
    root = str(Path(__file__).resolve().parent.parent)
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


def _topology_from_env() -> tuple[int, int]:
    """(world size, nodes) as set by torchrun / the deepspeed launcher / slurm; (1, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local > 0:
        return world, max(1, world // local)
    return world, int(os.environ.get("SLURM_NNODES", os.environ.get("NNODES", "1")) or 1)


# --------------------------------------------------------------------------------------------
# The tracker interface and the null tracker.
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Tracker(Protocol):
    """What the trainer calls. Every method returns quickly and never raises for MLflow reasons.

    Attributes:
        run_id: The MLflow run id (``local-<key>`` while the run has not reached the server;
            None for the null tracker). Store it in the checkpoint and pass it back as
            ``make_tracker(resume_run_id=...)``.
    """

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; nested dicts are flattened to dotted keys."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) tags."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step``; keys whose last logged step is >= ``step`` are skipped."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder under ``artifact_path``."""

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""


class NullTracker:
    """Does nothing. Used on ranks != 0 and when ``tracking.backend == "none"``.

    It makes no MLflow call and never imports MLflow, so non-zero ranks cannot contact the
    tracking server.
    """

    run_id: str | None = None
    parent: Tracker | None = None
    journal_path: Path | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """No-op."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """No-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """No-op."""

    def close(self, status: str = "FINISHED") -> None:
        """No-op."""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Journal and state files.
# --------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """Records of a journal file in order; a torn last line (process killed mid-write) is skipped.

    Args:
        path: A ``mlflow_journal.jsonl`` file.

    Returns:
        The parsed records (empty when the file does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, bad = [], 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict) and "kind" in record:
                records.append(record)
            else:
                bad += 1
    if bad:
        logger.warning("%s: %d unreadable line(s) skipped (a write interrupted by a kill)",
                       path, bad)
    return records


@dataclass
class _JournalView:
    """What a journal says: pending records, known run ids, and per-run history."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)
    last_steps: dict[str, dict[str, int]] = field(default_factory=dict)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    starts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> _JournalView:
        view = cls()
        done: set[str] = set()
        for rec in records:
            kind = rec["kind"]
            if kind in ("synced", "rejected"):
                done.update(rec.get("ids", ()))
            elif kind == "created":
                view.run_ids[rec["run"]] = rec["run_id"]
            elif kind == "start":
                view.starts.setdefault(rec["run"], rec)
            elif kind == "metrics":
                last = view.last_steps.setdefault(rec["run"], {})
                for key in rec["metrics"]:
                    last[key] = max(last.get(key, rec["step"]), rec["step"])
            elif kind == "params":
                view.params.setdefault(rec["run"], {}).update(rec["params"])
        view.pending = [r for r in records
                        if r.get("synced") is False and r.get("id") not in done]
        return view


class _Journal:
    """Append-only JSON-lines file; each line is flushed to the OS before the call returns."""

    def __init__(self, path: Path):
        self.path = path
        self._prefix = uuid.uuid4().hex[:8]
        self._count = 0
        self._fh = None

    def new_id(self) -> str:
        self._count += 1
        return f"{self._prefix}-{self._count}"

    def append(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Line buffering: a SIGKILL right after the call still leaves the line in the file.
            self._fh = self.path.open("a", encoding="utf-8", buffering=1)
        self._fh.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _load_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _lock(run_dir: Path, exclusive: bool):
    """Advisory lock: trainers share it, ``sync-mlflow`` needs it alone. None if unsupported."""
    if fcntl is None:
        return None
    fh = (run_dir / LOCK_NAME).open("a")
    try:
        fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise
    except OSError:  # e.g. a file system without flock: run unlocked rather than not at all.
        return fh
    return fh


# --------------------------------------------------------------------------------------------
# Retry policy and the MLflow side.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the tracker tries, and how long a call may take.

    Attributes:
        first_s: Wait after the first failure; doubled after each failed attempt.
        max_s: Cap of the wait (5 min: a returning server is noticed within 5 min).
        http_timeout_s: Per-request timeout of metric/param/tag calls (MLflow reads it as int).
        artifact_timeout_s: Per-request timeout of artifact uploads, which move whole files.
        http_retries: MLflow HTTP retries per call (0: our backoff does the retrying).
        flush_budget_s: Time one training-loop call may spend uploading a backlog; the rest
            continues on the next calls, in order.
    """

    first_s: float = 5.0
    max_s: float = 300.0
    http_timeout_s: int = 2
    artifact_timeout_s: int = 120
    http_retries: int = 0
    flush_budget_s: float = 2.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridden by ``PCC_MLFLOW_RETRY_S``, ``PCC_MLFLOW_RETRY_MAX_S`` and
        ``PCC_MLFLOW_HTTP_TIMEOUT_S``."""
        first = float(os.environ.get("PCC_MLFLOW_RETRY_S", cls.first_s))
        return cls(first_s=first,
                   max_s=max(first, float(os.environ.get("PCC_MLFLOW_RETRY_MAX_S", cls.max_s))),
                   http_timeout_s=max(1, int(float(os.environ.get("PCC_MLFLOW_HTTP_TIMEOUT_S",
                                                                  cls.http_timeout_s)))))


@contextlib.contextmanager
def _http_limits(timeout_s: int, retries: int) -> Iterator[None]:
    """MLflow reads these env vars at each request (mlflow/utils/rest_utils.py, 3.17)."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _import_mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError(
            f"tracking.backend='mlflow' needs MLflow, which is not installed: run "
            f"`pip install {MLFLOW_PIN}`, or set tracking.backend=none.") from exc
    return mlflow


class _Rejected(Exception):
    """MLflow refused the record itself (invalid value, deleted run); retrying cannot help."""


@dataclass
class _RunState:
    params: dict[str, str]
    last_steps: dict[str, int]


@dataclass
class SyncStats:
    """Counts of one session's uploads."""

    records: int = 0
    metric_points: int = 0
    skipped_points: int = 0
    rejected: int = 0


class _Uploader:
    """Applies journal records to MLflow through ``MlflowClient``."""

    def __init__(self, uri: str | None, policy: RetryPolicy, stats: SyncStats,
                 run_ids: dict[str, str], on_created):
        _import_mlflow()
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag, ViewType

        self._Metric, self._Param, self._RunTag, self._ViewType = Metric, Param, RunTag, ViewType
        self.policy = policy
        self.stats = stats
        self.run_ids = run_ids
        self.on_created = on_created
        with self.limits():
            self.client = MlflowClient(tracking_uri=uri)
        self._experiments: dict[str, str] = {}
        self._states: dict[str, _RunState] = {}
        self._warned_changed: set[str] = set()

    def limits(self, artifact: bool = False):
        timeout = self.policy.artifact_timeout_s if artifact else self.policy.http_timeout_s
        return _http_limits(timeout, self.policy.http_retries)

    def forget(self) -> None:
        """Drop cached server state: after a failure a batch may have landed in part."""
        self._states.clear()

    def run_state(self, run_id: str) -> _RunState:
        state = self._states.get(run_id)
        if state is None:
            run = self.client.get_run(run_id)
            # RunData.metrics keeps only values; the Metric objects of the latest point per key
            # carry the step (MLflow keeps the point with the highest step as "latest").
            latest = getattr(run.data, "_metric_objs", None)
            if latest is None:
                last = {k: max(m.step for m in self.client.get_metric_history(run_id, k))
                        for k in run.data.metrics}
            else:
                last = {m.key: int(m.step) for m in latest}
            state = _RunState(params=dict(run.data.params), last_steps=last)
            self._states[run_id] = state
        return state

    def run_id_of(self, key: str) -> str:
        run_id = self.run_ids.get(key)
        if run_id is None:
            raise _Rejected(f"no MLflow run for run key {key} (its start record is missing)")
        return run_id

    def experiment_id(self, name: str) -> str:
        if name in self._experiments:
            return self._experiments[name]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                exp_id = self.client.create_experiment(name)
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = self.client.get_experiment_by_name(name).experiment_id  # lost a race
        else:
            exp_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                logger.warning("MLflow experiment %r was deleted; restoring it to log into it",
                               name)
                self.client.restore_experiment(exp_id)
        self._experiments[name] = exp_id
        return exp_id

    # -- one group of records (a run start, one params record, or consecutive metrics) ------
    def apply(self, group: list[dict[str, Any]], replay: bool) -> None:
        kind = group[0]["kind"]
        try:
            with self.limits():
                if kind == "start":
                    self._start(group[0], replay)
                elif kind == "metrics":
                    self._metrics(group)
                elif kind == "params":
                    self._params(group[0])
                elif kind == "tags":
                    self.client.log_batch(self.run_id_of(group[0]["run"]), tags=[
                        self._RunTag(k, v) for k, v in group[0]["tags"].items()])
                elif kind == "artifact":
                    self._artifact(group[0])
                elif kind == "end":
                    self.client.set_terminated(self.run_id_of(group[0]["run"]),
                                               status=group[0]["status"],
                                               end_time=group[0]["t"])
                else:
                    raise _Rejected(f"unknown journal record kind {kind!r}")
        except _Rejected:
            raise
        except Exception as exc:
            self.forget()
            if getattr(exc, "error_code", None) in _REJECTED_CODES:
                raise _Rejected(_short_error(exc)) from exc
            raise
        self.stats.records += len(group)

    def _start(self, rec: dict[str, Any], replay: bool) -> None:
        key = rec["run"]
        tags = dict(rec.get("tags") or {})
        run_id = self.run_ids.get(key) or rec.get("resume_run_id")
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("resume: MLflow run %s does not exist at this tracking URI; "
                               "starting a new run (tag pcc.resumed_from=%s)", run_id, run_id)
                self.run_ids.pop(key, None)
                tags["pcc.resumed_from"] = run_id
            else:
                if self.run_ids.get(key) != run_id:
                    self._created(key, run_id, rec)
                return
        exp_id = self.experiment_id(rec["experiment"])
        if replay or rec.get("find"):
            # A crash between create_run and the journal's "created" line (or a sync from
            # another folder) would otherwise create the run twice; its run key tag finds it.
            found = self._find_by_key(exp_id, key)
            if found:
                self._created(key, found, rec)
                self.client.update_run(found, status="RUNNING")
                return
        tags["pcc.run_key"] = key
        parent = rec.get("parent_run_id")
        if parent and parent.startswith("local-"):
            parent = self._find_by_key(exp_id, parent[len("local-"):])
        elif rec.get("parent"):
            parent = self.run_ids.get(rec["parent"]) or self._find_by_key(exp_id, rec["parent"])
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(exp_id, start_time=rec["t"], tags=tags,
                                     run_name=rec.get("name"))
        self._states[run.info.run_id] = _RunState(params={}, last_steps={})
        self._created(key, run.info.run_id, rec)

    def _find_by_key(self, exp_id: str, key: str) -> str | None:
        found = self.client.search_runs([exp_id], filter_string=f"tags.`pcc.run_key` = '{key}'",
                                        max_results=1, run_view_type=self._ViewType.ALL)
        return found[0].info.run_id if found else None

    def _created(self, key: str, run_id: str, rec: dict[str, Any]) -> None:
        self.run_ids[key] = run_id
        self.on_created(key, run_id, rec)

    def _metrics(self, group: list[dict[str, Any]]) -> None:
        run_id = self.run_id_of(group[0]["run"])
        state = self.run_state(run_id)
        last = dict(state.last_steps)
        points = []
        for rec in group:
            step = int(rec["step"])
            for key, value in rec["metrics"].items():
                if step <= last.get(key, -math.inf):
                    self.stats.skipped_points += 1
                    continue
                last[key] = step
                points.append(self._Metric(key, float(value), int(rec["t"]), step))
        if points:
            self.client.log_batch(run_id, metrics=points)
        state.last_steps = last
        self.stats.metric_points += len(points)

    def _params(self, rec: dict[str, Any]) -> None:
        run_id = self.run_id_of(rec["run"])
        state = self.run_state(run_id)
        new, changed = {}, {}
        for key, value in rec["params"].items():
            old = state.params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                changed[key] = value
        tags = [self._RunTag(f"pcc.param_changed.{k}"[:MAX_KEY], v[:MAX_TAG_VALUE])
                for k, v in changed.items()]
        if changed and run_id not in self._warned_changed:
            self._warned_changed.add(run_id)
            logger.warning("run %s: params %s were logged before with other values; MLflow "
                           "params cannot change, so the new values are tags "
                           "pcc.param_changed.<key>", run_id, sorted(changed)[:10])
        self.client.log_batch(run_id, params=[self._Param(k, v) for k, v in new.items()],
                              tags=tags)
        state.params.update(new)

    def _artifact(self, rec: dict[str, Any]) -> None:
        run_id = self.run_id_of(rec["run"])
        path = Path(rec["path"])
        if not path.is_absolute():
            path = Path(rec["_base"]) / path
        if not path.exists():
            raise _Rejected(f"artifact {path} no longer exists")
        with self.limits(artifact=True):
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
            else:
                self.client.log_artifact(run_id, str(path), rec.get("artifact_path"))


# --------------------------------------------------------------------------------------------
# Session: one journal, one connection, the outage state machine.
# --------------------------------------------------------------------------------------------


class _Session:
    """The journal of one run folder and its connection to MLflow.

    Records go straight to MLflow while it answers and nothing is pending; otherwise they are
    appended as pending and uploaded in order when the backoff allows.
    """

    def __init__(self, run_dir: Path, uri: str | None, policy: RetryPolicy, *,
                 quiet: bool = False, lock: bool = True, sync_dir: Path | None = None):
        self.run_dir = run_dir
        self.sync_dir = sync_dir or run_dir
        self.uri = uri
        self.policy = policy
        self.quiet = quiet
        self.clock = time.monotonic
        self.journal = _Journal(run_dir / JOURNAL_NAME)
        view = _JournalView.of(read_journal(self.journal.path))
        self.view = view
        self.pending: deque[dict[str, Any]] = deque(view.pending)
        self.run_ids: dict[str, str] = dict(view.run_ids)
        self.state_files: dict[str, set[Path]] = {}
        for key, start in view.starts.items():
            self._remember_state_files(key, start)
        self.stats = SyncStats()
        self.online = True
        self.next_attempt = 0.0
        self.delay = policy.first_s
        self.last_error: str | None = None
        self.handles: list[MlflowTracker] = []
        self._rejected_runs: set[str | None] = set()
        self._uploader: _Uploader | None = None
        self._lock = None
        if lock:
            try:
                self._lock = _lock(run_dir, exclusive=False)
            except BlockingIOError:
                logger.info("%s is being synced by `pcc-train sync-mlflow`; continuing", run_dir)

    # -- plumbing ---------------------------------------------------------------------------
    def uploader(self) -> _Uploader:
        if self._uploader is None:
            self._uploader = _Uploader(self.uri, self.policy, self.stats, self.run_ids,
                                       self._on_created)
        return self._uploader

    def _remember_state_files(self, key: str, start: dict[str, Any]) -> None:
        for rel in start.get("state_files", ()):
            self.state_files.setdefault(key, set()).add(
                (self.journal.path.parent / rel).resolve())

    def _on_created(self, key: str, run_id: str, rec: dict[str, Any]) -> None:
        self.journal.append({"v": JOURNAL_VERSION, "kind": "created", "run": key,
                             "run_id": run_id, "t": _now_ms()})
        for path in self.state_files.get(key, ()):
            state = _load_state(path)
            changed = False
            if state.get("pipeline", {}).get("id") == key:
                state["pipeline"]["run_id"] = run_id
                changed = True
            for entry in state.get("runs", {}).values():
                if entry.get("run_key") == key:
                    entry["run_id"] = run_id
                    changed = True
            if changed:
                with contextlib.suppress(OSError):
                    _save_state(path, state)

    def _base(self, rec: dict[str, Any]) -> dict[str, Any]:
        # Artifact paths are stored relative to the journal so a moved run folder still syncs.
        return {**rec, "_base": str(self.journal.path.parent)} if rec["kind"] == "artifact" \
            else rec

    # -- the two paths ----------------------------------------------------------------------
    def submit(self, rec: dict[str, Any]) -> None:
        """Send ``rec`` now if MLflow is up and nothing is pending; else journal it as pending."""
        rec = {"v": JOURNAL_VERSION, "id": self.journal.new_id(), "t": _now_ms(), **rec}
        if rec["kind"] == "start":
            self._remember_state_files(rec["run"], rec)
        if self.pending or not self.online:
            self._add_pending(rec)
            self.flush()
            return
        try:
            self.uploader().apply([self._base(rec)], replay=False)
        except _Rejected as exc:
            self._reject(rec, str(exc), journaled=False)
            return
        except Exception as exc:
            self._add_pending(rec)
            self._went_offline(exc)
            return
        self.journal.append({**rec, "synced": True})
        self.last_error = None

    def _add_pending(self, rec: dict[str, Any]) -> None:
        self.journal.append({**rec, "synced": False})
        self.pending.append(rec)

    def _next_group(self) -> list[dict[str, Any]]:
        first = self.pending[0]
        group = [first]
        if first["kind"] == "metrics":
            points = len(first["metrics"])
            for rec in list(self.pending)[1:]:
                # One log_batch takes at most 1000 metrics (MLflow 3.17 MAX_METRICS_PER_BATCH).
                if rec["kind"] != "metrics" or rec["run"] != first["run"] or \
                        points + len(rec["metrics"]) > MAX_METRICS_PER_BATCH:
                    break
                group.append(rec)
                points += len(rec["metrics"])
        return group

    def flush(self, *, force: bool = False, budget_s: float | None = None) -> bool:
        """Upload pending records in order if the backoff allows (or ``force``).

        Returns:
            True when nothing is pending afterwards.
        """
        if not self.pending:
            return True
        now = self.clock()
        if not force and now < self.next_attempt:
            return False
        deadline = now + (self.policy.flush_budget_s if budget_s is None else budget_s)
        done: list[str] = []
        was_offline = not self.online
        try:
            while self.pending:
                group = self._next_group()
                try:
                    self.uploader().apply([self._base(r) for r in group], replay=True)
                    done.extend(r["id"] for r in group)
                    for _ in group:
                        self.pending.popleft()
                except _Rejected:
                    # Find the bad record(s): the rest of the group is still good.
                    for rec in group:
                        try:
                            self.uploader().apply([self._base(rec)], replay=True)
                            done.append(rec["id"])
                        except _Rejected as exc:
                            self._reject(rec, str(exc), journaled=True)
                        self.pending.popleft()
                if self.clock() >= deadline:
                    break
        except Exception as exc:
            self._went_offline(exc)
            return False
        finally:
            if done:
                self.journal.append({"v": JOURNAL_VERSION, "kind": "synced", "ids": done,
                                     "t": _now_ms()})
        self.last_error = None
        self.online = True
        self.delay = self.policy.first_s
        if not self.pending and was_offline and not self.quiet:
            logger.info("MLflow at %s answers again; the journal is uploaded (%s)",
                        _safe_uri(self.uri), self.journal.path)
        return not self.pending

    def _reject(self, rec: dict[str, Any], reason: str, journaled: bool) -> None:
        self.stats.rejected += 1
        # Once per run: a run deleted in the UI would otherwise warn at every step.
        log = logger.debug if rec.get("run") in self._rejected_runs else logger.warning
        self._rejected_runs.add(rec.get("run"))
        log("MLflow rejected the %s record of run %s (%s); it is kept in %s and not retried",
            rec["kind"], rec.get("run"), reason, self.journal.path)
        if not journaled:
            self.journal.append({**rec, "synced": False})
        self.journal.append({"v": JOURNAL_VERSION, "kind": "rejected", "ids": [rec["id"]],
                             "reason": reason, "t": _now_ms()})

    def _went_offline(self, exc: BaseException) -> None:
        if self._uploader is not None:
            self._uploader.forget()
        was_online, self.online = self.online, False
        self.last_error = _short_error(exc)
        self.next_attempt = self.clock() + self.delay
        story = (_safe_uri(self.uri), str(self.sync_dir))
        if story not in _WARNED and not self.quiet:
            _WARNED.add(story)
            logger.warning(
                "MLflow tracking at %s is unreachable (%s). Training continues: tracking records "
                "are appended to the journal %s and uploaded in order when the server answers "
                "(retry in %.0f s, backing off to %.0f s), or later with `pcc-train sync-mlflow "
                "%s`.", _safe_uri(self.uri), self.last_error, self.journal.path, self.delay,
                self.policy.max_s, self.sync_dir)
        elif not self.quiet and was_online:
            logger.info("MLflow at %s unreachable again (%s); journaling to %s",
                        _safe_uri(self.uri), self.last_error, self.journal.path)
        else:
            logger.debug("MLflow still unreachable (%s); next attempt in %.0f s",
                         self.last_error, self.delay)
        self.delay = min(self.delay * 2, self.policy.max_s)

    def server_state(self, key: str) -> _RunState | None:
        """Params and last steps the server holds for run ``key``; None if unknown/offline."""
        run_id = self.run_ids.get(key)
        if run_id is None or not self.online or self.pending:
            return None
        try:
            with self.uploader().limits():
                return self.uploader().run_state(run_id)
        except Exception as exc:
            self._went_offline(exc)
            return None

    def release(self, handle: MlflowTracker) -> None:
        if handle in self.handles:
            self.handles.remove(handle)
        if self.handles:
            return
        # End of the stage: one more try regardless of the backoff (costs <= ~2 s if down), and
        # no time budget, since the training loop is over.
        if self.flush(force=True, budget_s=math.inf):
            self.drain_siblings(math.inf)
        elif not self.quiet:
            logger.info("%d tracking record(s) remain in %s; upload them with `pcc-train "
                        "sync-mlflow %s`", len(self.pending), self.journal.path, self.sync_dir)
        self.close()

    def drain_siblings(self, budget_s: float) -> None:
        """Upload what other folders of this pipeline left pending (e.g. stage 1 ended during an
        outage and the server is back for stage 2). Folders a live trainer holds are skipped."""
        if not self.online or self.pending:
            return
        deadline = self.clock() + budget_s
        for journal in _find_journals(self.sync_dir):
            if journal.parent == self.run_dir or self.clock() >= deadline:
                continue
            if not any(r.get("synced") is False for r in read_journal(journal)):
                continue
            try:
                lock = _lock(journal.parent, exclusive=True)
            except BlockingIOError:
                continue
            sibling = _Session(journal.parent, self.uri, self.policy, quiet=True, lock=False)
            try:
                sibling.flush(force=True, budget_s=max(0.0, deadline - self.clock()))
                logger.info("uploaded %d journaled record(s) of %s (%d left)",
                            sibling.stats.records, journal.parent, len(sibling.pending))
            finally:
                sibling.close()
                if lock is not None:
                    lock.close()
            if not sibling.online:
                return  # down again: the sibling stays pending for later or sync-mlflow

    def close(self) -> None:
        self.journal.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


# --------------------------------------------------------------------------------------------
# The rank-0 tracker.
# --------------------------------------------------------------------------------------------


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _valid_name(name: str) -> bool:
    return (0 < len(name) <= MAX_KEY and bool(_VALID_NAME.match(name))
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")))


class MlflowTracker:
    """Rank-0 tracker of one MLflow run; build it with :func:`make_tracker`.

    Attributes:
        parent: The pipeline run this run is nested under (a tracker on the same journal), or
            None. Closing this tracker also ends the parent with the same status.
        journal_path: This run folder's journal.
    """

    def __init__(self, session: _Session, run_key: str, role: str, *,
                 parent: MlflowTracker | None = None):
        self._session = session
        self._key = run_key
        self.role = role
        self.parent = parent
        self.journal_path = session.journal.path
        self._closed = False
        self._bad_names: set[str] = set()
        self._last_steps: dict[str, int] = dict(session.view.last_steps.get(run_key, {}))
        self._params: dict[str, str] = dict(session.view.params.get(run_key, {}))
        self.skipped_steps = 0
        session.handles.append(self)

    @property
    def run_id(self) -> str:
        """The MLflow run id, or ``local-<key>`` until the run reaches the server."""
        return self._session.run_ids.get(self._key) or f"local-{self._key}"

    def _sync_from_server(self) -> None:
        state = self._session.server_state(self._key)
        if state is not None:
            for key, step in state.last_steps.items():
                self._last_steps[key] = max(step, self._last_steps.get(key, step))
            self._params.update(state.params)

    def _names_ok(self, names, what: str) -> list[str]:
        good = []
        for name in names:
            if _valid_name(name):
                good.append(name)
            elif name not in self._bad_names:
                self._bad_names.add(name)
                logger.warning("%s name %r is not valid in MLflow (letters, digits, _ - . / : "
                               "and spaces, at most %d characters); it is not logged",
                               what, name, MAX_KEY)
        return good

    def _live(self, what: str) -> bool:
        if self._closed:
            logger.debug("%s on closed tracker %s ignored", what, self.run_id)
        return not self._closed

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (redacted, nested dicts flattened, values cut to 6000 characters).

        A param already logged with the same value is skipped, so re-logging the config on
        resume is free; a different value cannot replace an MLflow param and is recorded as the
        tag ``pcc.param_changed.<key>`` instead.
        """
        if not self._live("log_params"):
            return
        flat = redact(_flatten(params))
        values = {k: _as_text(flat[k])[:MAX_PARAM_VALUE] for k in self._names_ok(flat, "param")}
        values = {k: v for k, v in values.items() if self._params.get(k) != v}
        if values:
            self._params.update(values)
            self._session.submit({"kind": "params", "run": self._key, "params": values})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags (redacted, values cut to 8000 characters)."""
        if not self._live("set_tags"):
            return
        clean = redact({k: _as_text(v) for k, v in tags.items()})
        values = {k: clean[k][:MAX_TAG_VALUE] for k in self._names_ok(clean, "tag")}
        if values:
            self._session.submit({"kind": "tags", "run": self._key, "tags": values})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; keys already logged at a step >= ``step`` are skipped.

        Values may be Python numbers or one-element tensors; NaN is logged as NaN.
        """
        if not self._live("log_metrics"):
            return
        step = int(step)
        points: dict[str, float] = {}
        for key in self._names_ok(metrics, "metric"):
            if step <= self._last_steps.get(key, -math.inf):
                self.skipped_steps += 1
                logger.debug("%s step %d <= last logged step %d: skipped (replay after resume)",
                             key, step, self._last_steps[key])
                continue
            try:
                points[key] = float(metrics[key])
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, metrics[key])
                continue
            self._last_steps[key] = step
        if points:
            self._session.submit({"kind": "metrics", "run": self._key, "step": step,
                                  "metrics": points})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder. Text files containing secrets are uploaded redacted."""
        if not self._live("log_artifact"):
            return
        path = Path(path).resolve()
        if not path.exists():
            logger.warning("log_artifact: %s does not exist; not logged", path)
            return
        try:
            upload = _redacted_copy(path, self._session.run_dir / PRIVATE_DIR / "redacted")
        except OSError as exc:
            logger.warning("log_artifact: cannot scan %s for secrets (%s); not logged", path, exc)
            return
        base = self._session.journal.path.parent
        stored = os.path.relpath(upload, base) if upload.is_relative_to(base) else str(upload)
        self._session.submit({"kind": "artifact", "run": self._key, "path": stored,
                              "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED") -> None:
        """End the run (and its pipeline parent) and try once more to upload the journal.

        Also renders ``<run_dir>/metrics.png`` (loss and Pearson r curves) from the journal and
        logs it under ``plots/``. Calling close twice is harmless.
        """
        if self._closed:
            return
        if self.role != "pipeline" and self._last_steps:
            try:
                png = plot_metrics(self.journal_path, self._session.run_dir / PLOT_NAME,
                                   run_key=self._key)
                self.log_artifact(png, "plots")
            except Exception as exc:  # a plot must never fail a finished run
                logger.warning("metric plot not written: %s", _short_error(exc))
        self._closed = True
        self._session.submit({"kind": "end", "run": self._key, "status": status})
        if self.parent is not None and not self.parent._closed:
            self.parent._closed = True
            self._session.submit({"kind": "end", "run": self.parent._key, "status": status})
            self._session.release(self.parent)
        self._session.release(self)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")


def _redacted_copy(path: Path, out_dir: Path) -> Path:
    """``path`` itself when no text file in it holds a secret; else a redacted mirror.

    A folder mirror links the clean files (model weights are not copied) and writes redacted
    copies of the others.
    """
    secrets = _env_secrets()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    dirty: dict[Path, str] = {}
    for file in files:
        if file.stat().st_size > _MAX_SCAN_BYTES:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        clean = redact_text(text, secrets)
        if clean != text:
            dirty[file] = clean
    if not dirty:
        return path
    target = out_dir / uuid.uuid4().hex[:8] / path.name
    if path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dirty[path], encoding="utf-8")
    else:
        for file in files:
            dest = target / file.relative_to(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if file in dirty:
                dest.write_text(dirty[file], encoding="utf-8")
            else:
                try:
                    dest.symlink_to(file)
                except OSError:
                    shutil.copy2(file, dest)
    logger.info("artifact %s contains secrets; uploading a redacted copy", path)
    return target


# --------------------------------------------------------------------------------------------
# Construction.
# --------------------------------------------------------------------------------------------


def _pipeline_dir(cfg: PccConfig, run_dir: Path) -> Path:
    """The run folder of the whole pipeline: ``cfg.run.output_dir`` if it contains ``run_dir``."""
    out = Path(cfg.run.output_dir).resolve()
    return out if run_dir == out or run_dir.is_relative_to(out) else run_dir


def _key_of(run_id: str, states: list[dict[str, Any]], view: _JournalView) -> str | None:
    if run_id.startswith("local-"):
        return run_id[len("local-"):]
    for state in states:
        if state.get("pipeline", {}).get("run_id") == run_id:
            return state["pipeline"]["id"]
        for entry in state.get("runs", {}).values():
            if entry.get("run_id") == run_id:
                return entry["run_key"]
    return next((k for k, v in view.run_ids.items() if v == run_id), None)


def make_tracker(cfg: PccConfig, run_dir: Path, *, rank: int, resume_run_id: str | None = None,
                 parent_run_id: str | None = None, stage: str | None = None) -> Tracker:
    """The tracker for this process.

    On rank 0 with ``tracking.backend == "mlflow"`` this opens (or re-attaches to) an MLflow run
    and logs, before returning: the flattened resolved config as params, the environment tags
    (world size and nodes read from ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``) and the resolved
    config as ``config/config.yaml``. If MLflow is unreachable this returns just as fast (at
    most ~2 s per attempt) and journals everything.

    Args:
        cfg: The resolved config (tracking URI, experiment, run name).
        run_dir: Folder of this run's journal and ``tracking.json`` (the stage folder).
        rank: Global rank; every rank but 0 gets a :class:`NullTracker`.
        resume_run_id: The ``run_id`` stored in the checkpoint being resumed.
        parent_run_id: Nest under this MLflow run instead of the folder's pipeline run.
        stage: ``"stage1"``/``"stage2"`` for a stage run nested under the pipeline run; None
            for the pipeline run itself.

    Returns:
        A :class:`Tracker`.

    Raises:
        ImportError: MLflow is not installed (names ``pip install mlflow==3.17.2``).
    """
    if rank != 0 or cfg.tracking.backend == "none":
        return NullTracker()
    mlflow = _import_mlflow()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # None -> $MLFLOW_TRACKING_URI -> MLflow's default sqlite:///mlflow.db, made absolute now so
    # a later chdir cannot move the store.
    uri = cfg.tracking.tracking_uri or mlflow.get_tracking_uri()
    pipe_dir = _pipeline_dir(cfg, run_dir)
    session = _Session(run_dir, uri, RetryPolicy.from_env(), sync_dir=pipe_dir)
    pipe_file, run_file = pipe_dir / STATE_NAME, run_dir / STATE_NAME
    pipe_state = _load_state(pipe_file)
    run_state = pipe_state if run_file == pipe_file else _load_state(run_file)
    where = {"tracking_uri": _safe_uri(uri), "experiment": redact_text(cfg.tracking.experiment)}

    # Which run: resume_run_id (from the checkpoint) -> its local key, if this folder knows it.
    resume_key, resume_known = None, None
    if resume_run_id:
        resume_key = _key_of(resume_run_id, [run_state, pipe_state], session.view)
        if not resume_run_id.startswith("local-"):
            resume_known = resume_run_id

    def open_run(key: str, role: str, name: str, tags: dict[str, str], known: str | None,
                 extra: dict[str, Any], parent: MlflowTracker | None = None) -> MlflowTracker:
        if known and key not in session.run_ids:
            session.run_ids[key] = known
        files = {run_file} | ({pipe_file} if role == "pipeline" else set())
        # The run name (mlflow.runName) and the experiment name are stored like tags; a token
        # pasted into run.name used to reach MLflow verbatim while its pcc.run_name tag was
        # redacted.
        session.submit({"kind": "start", "run": key, "role": role, "name": redact_text(name),
                        "experiment": redact_text(cfg.tracking.experiment),
                        "tags": redact(tags),
                        "state_files": sorted(os.path.relpath(f, run_dir) for f in files),
                        **extra})
        handle = MlflowTracker(session, key, role, parent=parent)
        handle._sync_from_server()
        handle.set_tags(environment_tags(*_topology_from_env()))
        handle.log_params(cfg.flat())
        return handle

    parent: MlflowTracker | None = None
    extra: dict[str, Any] = {}
    if parent_run_id is None:
        pipeline = pipe_state.get("pipeline")
        if stage is None and resume_key is not None:
            pipeline = {"id": resume_key, "run_id": resume_known}
        elif pipeline is None or (stage == "stage1" and not resume_run_id):
            pipeline = {"id": uuid.uuid4().hex, "run_id": None}
        pipe_state.update(pipeline=pipeline, **where)
        _save_state(pipe_file, pipe_state)
        pipe_tags = {"pcc.pipeline_id": pipeline["id"], "pcc.role": "pipeline",
                     "pcc.run_name": cfg.run.name}
        parent = open_run(pipeline["id"], "pipeline", cfg.run.name, pipe_tags,
                          pipeline.get("run_id"), {})
        if stage is None:
            _log_config(parent, cfg)
            session.drain_siblings(session.policy.flush_budget_s * 5)
            return parent
        extra["parent"] = pipeline_id = pipeline["id"]
    else:
        extra["parent_run_id"] = parent_run_id
        pipeline_id = parent_run_id

    if resume_run_id and resume_key is None:
        # A run this folder never saw (e.g. a copied checkpoint): attach by id if the server
        # has it; the start record falls back to a new run tagged pcc.resumed_from.
        extra["resume_run_id"] = resume_known
        resume_known = None
    if resume_key is not None and resume_key not in session.run_ids:
        extra["find"] = True  # e.g. local-<key> from a checkpoint of an offline start
    key = resume_key or uuid.uuid4().hex
    run_state.setdefault("runs", {})[stage or "main"] = {
        "run_key": key, "run_id": resume_known or session.run_ids.get(key), "stage": stage}
    run_state.update(where)
    _save_state(run_file, run_state)
    tags = {"pcc.pipeline_id": pipeline_id, "pcc.role": stage or "main",
            "pcc.run_name": cfg.run.name}
    if stage:
        tags["pcc.stage"] = stage
    name = f"{cfg.run.name}-{stage}" if stage else cfg.run.name
    tracker = open_run(key, stage or "main", name, tags, resume_known, extra, parent)
    _log_config(tracker, cfg)
    # 10 s at most at stage start; whatever is left goes at close or with sync-mlflow.
    session.drain_siblings(session.policy.flush_budget_s * 5)
    if tracker.run_id.startswith("local-"):
        logger.info("tracking run %s lives in the journal %s until MLflow answers",
                    tracker.run_id, tracker.journal_path)
    return tracker


def _log_config(tracker: MlflowTracker, cfg: PccConfig) -> None:
    path = tracker._session.run_dir / PRIVATE_DIR / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact_text(cfg.to_yaml()), encoding="utf-8")
    tracker.log_artifact(path, "config")


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------

DEFAULT_PLOT_KEYS = ("train/loss", "train/pearson_r")


def metric_history(path: Path, run_key: str | None = None) -> dict[str, dict[str, list]]:
    """``{run label: {metric key: [(step, value), ...]}}`` from a journal file."""
    records = read_journal(path)
    labels = {r["run"]: r.get("role") or r["run"][:8] for r in records if r["kind"] == "start"}
    out: dict[str, dict[str, list]] = {}
    for rec in records:
        if rec["kind"] != "metrics" or (run_key is not None and rec["run"] != run_key):
            continue
        series = out.setdefault(labels.get(rec["run"], rec["run"][:8]), {})
        for key, value in rec["metrics"].items():
            series.setdefault(key, []).append((rec["step"], value))
    return out


def plot_metrics(journal_or_history: str | Path | Mapping[str, Any], out_png: str | Path, *,
                 keys: list[str] | None = None, run_key: str | None = None) -> Path:
    """Loss and Pearson r curves (and eval curves) as a PNG, drawn with matplotlib's Agg canvas.

    Args:
        journal_or_history: A journal file (or the folder holding one), or a history
            ``{"train/loss": [(step, value), ...], ...}``, or ``{label: history}`` for several
            runs (e.g. ``{"stage1": {...}, "stage2": {...}}``).
        out_png: Where to write the image.
        keys: Metric keys to draw, one panel each; default ``train/loss``, ``train/pearson_r``
            and every ``eval/`` key with at least two points.
        run_key: Only this run of the journal.

    Returns:
        ``out_png`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(journal_or_history, Mapping):
        values = list(journal_or_history.values())
        runs = dict(journal_or_history) if values and isinstance(values[0], Mapping) else \
            {"": dict(journal_or_history)}
    else:
        path = Path(journal_or_history)
        runs = metric_history(path / JOURNAL_NAME if path.is_dir() else path, run_key)
    if keys is None:
        present = {k for series in runs.values() for k, pts in series.items()}
        keys = [k for k in DEFAULT_PLOT_KEYS if k in present] + sorted(
            k for k in present if k.startswith("eval/")
            and max(len(s.get(k, ())) for s in runs.values()) >= 2)
    fig = Figure(figsize=(7, 2.6 * max(1, len(keys))), dpi=100)
    FigureCanvasAgg(fig)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        for label, series in runs.items():
            points = sorted(series.get(key, ()))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label or None,
                        marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if any(label for label in runs):
            ax.legend(loc="best", fontsize="small")
    fig.axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------------
# pcc-train sync-mlflow RUN_DIR
# --------------------------------------------------------------------------------------------


def _find_journals(root: Path) -> list[Path]:
    found = [root / JOURNAL_NAME] if (root / JOURNAL_NAME).is_file() else []
    # The pipeline folder first, then stage folders: parents are created before children.
    found += sorted(p for p in root.rglob(JOURNAL_NAME) if p.parent != root)
    return found


def sync_main(argv: list[str] | None = None) -> int:
    """``pcc-train sync-mlflow RUN_DIR [--tracking-uri URI] [--dry-run]``.

    Uploads every pending record of every journal under ``RUN_DIR`` (the run folder and its
    stage folders) in order, and marks them synced. Safe to repeat: runs are found again by
    their ``pcc.run_key`` tag, params already present are skipped and metric steps at or below
    the server's last step are skipped, so nothing is duplicated.

    Returns:
        0 when nothing is left to upload, 1 when the server could not be reached or a trainer
        is still writing the folder, 2 when there is no journal.
    """
    parser = argparse.ArgumentParser(
        prog="pcc-train sync-mlflow",
        description="Upload MLflow records journaled while the tracking server was unreachable.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (cfg.run.output_dir)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: the one the run used (tracking.json), "
                             "then $MLFLOW_TRACKING_URI, then MLflow's default")
    parser.add_argument("--dry-run", action="store_true", help="count pending records only")
    args = parser.parse_args(argv)
    root = Path(args.run_dir).resolve()
    journals = _find_journals(root)
    if not journals:
        print(f"pcc-train sync-mlflow: no {JOURNAL_NAME} under {root}; pass the run folder "
              "(cfg.run.output_dir).", file=sys.stderr)
        return 2
    if not args.dry_run:
        try:
            _import_mlflow()
        except ImportError as exc:
            print(f"pcc-train sync-mlflow: {exc}", file=sys.stderr)
            return 2
    status = 0
    # A person waits for this command: longer timeouts and a few HTTP retries are fine here.
    policy = RetryPolicy(http_timeout_s=30, http_retries=2)
    for journal in journals:
        folder = journal.parent
        uri = args.tracking_uri or _load_state(folder / STATE_NAME).get("tracking_uri")
        if not uri or REDACTED in uri or uri == _safe_uri(None):
            uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        try:
            lock = _lock(folder, exclusive=True)
        except BlockingIOError:
            print(f"{journal}: a running trainer is writing this folder; it uploads its own "
                  "journal when the server answers. Skipped.", file=sys.stderr)
            status = 1
            continue
        try:
            session = _Session(folder, uri, policy, quiet=True, lock=False)
            pending = len(session.pending)
            if pending == 0 or args.dry_run:
                print(f"{journal}: {pending} pending record(s)"
                      + ("" if pending else "; nothing to upload"))
                continue
            try:
                ok = session.flush(force=True, budget_s=math.inf)
            finally:
                session.close()
            stats = session.stats
            print(f"{journal}: uploaded {stats.records} record(s) ({stats.metric_points} metric "
                  f"points; {stats.skipped_points} already on the server) to {_safe_uri(uri)}; "
                  f"{len(session.pending)} left" + (f"; {stats.rejected} rejected"
                                                    if stats.rejected else ""))
            if not ok:
                print(f"{journal}: MLflow at {_safe_uri(uri)} is unreachable: "
                      f"{session.last_error}", file=sys.stderr)
                status = 1
        finally:
            if lock is not None:
                lock.close()
    return status
