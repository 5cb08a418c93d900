"""Construction: :func:`make_tracker`, the one constructor the trainer needs (stage link,
resume re-attach, the config logged with every run)."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcc_dist.tracking.constants import PRIVATE_DIR, STATE_NAME
from pcc_dist.tracking.environment import _topology_from_env, environment_tags
from pcc_dist.tracking.interface import NullTracker, Tracker
from pcc_dist.tracking.journal import _JournalView, _load_state, _save_state
from pcc_dist.tracking.mlflow_tracker import MlflowTracker
from pcc_dist.tracking.redaction import _safe_uri, redact, redact_text
from pcc_dist.tracking.retry import RetryPolicy
from pcc_dist.tracking.session import _Session
from pcc_dist.tracking.uploader import _import_mlflow

if TYPE_CHECKING:
    from pcc_dist.config import PccConfig

logger = logging.getLogger(__name__)


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
