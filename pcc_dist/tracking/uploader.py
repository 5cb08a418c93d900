"""The MLflow side: applies journal records through ``MlflowClient`` (MLflow imported lazily)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcc_dist.tracking.constants import MAX_KEY, MAX_TAG_VALUE, MLFLOW_PIN
from pcc_dist.tracking.redaction import short_error
from pcc_dist.tracking.retry import RetryPolicy, restore_env

logger = logging.getLogger(__name__)


# MLflow error codes that mean "this record is invalid", as opposed to "the server is down":
# retrying such a record would block the journal forever, so it is dropped with a warning.
_REJECTED_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST",
})


def import_mlflow():
    """The ``mlflow`` module; an ImportError naming the pinned version when it is missing."""
    try:
        import mlflow
    except ImportError as exc:
        raise ImportError(
            f"tracking.backend='mlflow' needs MLflow, which is not installed: run "
            f"`pip install {MLFLOW_PIN}`, or set tracking.backend=none.") from exc
    return mlflow


class Rejected(Exception):
    """MLflow refused the record itself (invalid value, deleted run); retrying cannot help."""


@dataclass
class RunState:
    """What the server holds for one run: its params and the last step of each metric."""

    params: dict[str, str]
    last_steps: dict[str, int]


@dataclass
class SyncStats:
    """Counts of one session's uploads."""

    records: int = 0
    metric_points: int = 0
    skipped_points: int = 0
    rejected: int = 0


class Uploader:
    """Applies journal records to MLflow through ``MlflowClient``."""

    def __init__(self, uri: str | None, policy: RetryPolicy, stats: SyncStats,
                 run_ids: dict[str, str], on_created):
        import_mlflow()
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag, ViewType

        self._Metric, self._Param, self._RunTag, self._ViewType = Metric, Param, RunTag, ViewType
        self.policy = policy
        self.stats = stats
        self.run_ids = run_ids
        self.on_created = on_created
        self._saved_env = policy.set_mlflow_http_limits()
        try:
            self.client = MlflowClient(tracking_uri=uri)
        except Exception:
            self.close()
            raise
        self._experiments: dict[str, str] = {}
        self._states: dict[str, RunState] = {}
        self._warned_changed: set[str] = set()

    def close(self) -> None:
        """Give MLflow's HTTP settings back the values they had before this uploader."""
        restore_env(self._saved_env)

    def forget(self) -> None:
        """Drop cached server state: after a failure a batch may have landed in part."""
        self._states.clear()

    def run_state(self, run_id: str) -> RunState:
        state = self._states.get(run_id)
        if state is None:
            run = self.client.get_run(run_id)
            # RunData.metrics keeps only values; the proto of the run data carries the latest
            # point per key with its step (MLflow keeps the point with the highest step).
            last = {m.key: int(m.step) for m in run.data.to_proto().metrics}
            state = RunState(params=dict(run.data.params), last_steps=last)
            self._states[run_id] = state
        return state

    def run_id_of(self, key: str) -> str:
        run_id = self.run_ids.get(key)
        if run_id is None:
            raise Rejected(f"no MLflow run for run key {key} (its start record is missing)")
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
                raise Rejected(f"unknown journal record kind {kind!r}")
        except Rejected:
            raise
        except Exception as exc:
            self.forget()
            if getattr(exc, "error_code", None) in _REJECTED_CODES:
                raise Rejected(short_error(exc)) from exc
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
        self._states[run.info.run_id] = RunState(params={}, last_steps={})
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
            raise Rejected(f"artifact {path} no longer exists")
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
        else:
            self.client.log_artifact(run_id, str(path), rec.get("artifact_path"))
