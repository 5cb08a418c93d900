"""Construction: :func:`make_tracker`, the one constructor the trainer needs (stage link,
resume re-attach, the config logged with every run), the :class:`Tracker` protocol it returns
and the :class:`NullTracker` of ranks other than 0."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pcc_dist.tracking.constants import PRIVATE_DIR, STATE_NAME
from pcc_dist.tracking.environment import environment_tags, topology_from_env
from pcc_dist.tracking.journal import JournalView, load_state, save_state
from pcc_dist.tracking.redaction import redact, redact_text, safe_uri
from pcc_dist.tracking.retry import RetryPolicy
from pcc_dist.tracking.tracker import MlflowTracker
from pcc_dist.tracking.uploader import import_mlflow

if TYPE_CHECKING:
    from pcc_dist.config import PccConfig

logger = logging.getLogger(__name__)


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
    parent: None = None
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


def _pipeline_dir(cfg: PccConfig, run_dir: Path) -> Path:
    """The run folder of the whole pipeline: ``cfg.run.output_dir`` if it contains ``run_dir``."""
    out = Path(cfg.run.output_dir).resolve()
    return out if run_dir == out or run_dir.is_relative_to(out) else run_dir


def _key_of(run_id: str, states: list[dict[str, Any]], view: JournalView) -> str | None:
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
    mlflow = import_mlflow()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # None -> $MLFLOW_TRACKING_URI -> MLflow's default sqlite:///mlflow.db, made absolute now so
    # a later chdir cannot move the store.
    uri = cfg.tracking.tracking_uri or mlflow.get_tracking_uri()
    pipe_dir = _pipeline_dir(cfg, run_dir)
    tracker = MlflowTracker(run_dir, uri, RetryPolicy.from_env(), sync_dir=pipe_dir)
    pipe_file, run_file = pipe_dir / STATE_NAME, run_dir / STATE_NAME
    pipe_state = load_state(pipe_file)
    run_state = pipe_state if run_file == pipe_file else load_state(run_file)
    where = {"tracking_uri": safe_uri(uri), "experiment": redact_text(cfg.tracking.experiment)}

    # Which run: resume_run_id (from the checkpoint) -> its local key, if this folder knows it.
    resume_key, resume_known = None, None
    if resume_run_id:
        resume_key = _key_of(resume_run_id, [run_state, pipe_state], tracker.view)
        if not resume_run_id.startswith("local-"):
            resume_known = resume_run_id

    def open_run(key: str, role: str, name: str, tags: dict[str, str], known: str | None,
                 extra: dict[str, Any]) -> None:
        if known and key not in tracker.run_ids:
            tracker.run_ids[key] = known
        files = {run_file} | ({pipe_file} if role == "pipeline" else set())
        # The run name (mlflow.runName) and the experiment name are stored like tags, so they
        # are redacted like tags: a token pasted into run.name must not reach MLflow.
        tracker.start_run(key, role, {
            "name": redact_text(name), "experiment": redact_text(cfg.tracking.experiment),
            "tags": redact(tags),
            "state_files": sorted(os.path.relpath(f, run_dir) for f in files), **extra})
        tracker.set_tags(environment_tags(*topology_from_env()))
        tracker.log_params(cfg.flat())

    extra: dict[str, Any] = {}
    if parent_run_id is None:
        pipeline = pipe_state.get("pipeline")
        if stage is None and resume_key is not None:
            pipeline = {"id": resume_key, "run_id": resume_known}
        elif pipeline is None or (stage == "stage1" and not resume_run_id):
            pipeline = {"id": uuid.uuid4().hex, "run_id": None}
        pipe_state.update(pipeline=pipeline, **where)
        save_state(pipe_file, pipe_state)
        pipe_tags = {"pcc.pipeline_id": pipeline["id"], "pcc.role": "pipeline",
                     "pcc.run_name": cfg.run.name}
        open_run(pipeline["id"], "pipeline", cfg.run.name, pipe_tags, pipeline.get("run_id"), {})
        if stage is None:
            _log_config(tracker, cfg)
            tracker.drain_siblings(tracker.policy.flush_budget_s * 5)
            return tracker
        extra["parent"] = pipeline_id = pipeline["id"]
    else:
        extra["parent_run_id"] = parent_run_id
        pipeline_id = parent_run_id

    if resume_run_id and resume_key is None:
        # A run this folder never saw (e.g. a copied checkpoint): attach by id if the server
        # has it; the start record falls back to a new run tagged pcc.resumed_from.
        extra["resume_run_id"] = resume_known
        resume_known = None
    if resume_key is not None and resume_key not in tracker.run_ids:
        extra["find"] = True  # e.g. local-<key> from a checkpoint of an offline start
    key = resume_key or uuid.uuid4().hex
    run_state.setdefault("runs", {})[stage or "main"] = {
        "run_key": key, "run_id": resume_known or tracker.run_ids.get(key), "stage": stage}
    run_state.update(where)
    save_state(run_file, run_state)
    tags = {"pcc.pipeline_id": pipeline_id, "pcc.role": stage or "main",
            "pcc.run_name": cfg.run.name}
    if stage:
        tags["pcc.stage"] = stage
    name = f"{cfg.run.name}-{stage}" if stage else cfg.run.name
    open_run(key, stage or "main", name, tags, resume_known, extra)
    _log_config(tracker, cfg)
    # 10 s at most at stage start; whatever is left goes at close or with sync-mlflow.
    tracker.drain_siblings(tracker.policy.flush_budget_s * 5)
    if tracker.run_id.startswith("local-"):
        logger.info("tracking run %s lives in the journal %s until MLflow answers",
                    tracker.run_id, tracker.journal_path)
    return tracker


def _log_config(tracker: MlflowTracker, cfg: PccConfig) -> None:
    path = tracker.run_dir / PRIVATE_DIR / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(redact_text(cfg.to_yaml()), encoding="utf-8")
    tracker.log_artifact(path, "config")
