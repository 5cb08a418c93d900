"""The rank-0 tracker: one run folder's journal, its connection to MLflow, the outage state
machine, and the run (plus its pipeline parent) that ``log_*`` write to."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pcc_dist.tracking.constants import (
    JOURNAL_NAME,
    JOURNAL_VERSION,
    MAX_KEY,
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    PLOT_NAME,
    PRIVATE_DIR,
    valid_name,
)
from pcc_dist.tracking.journal import (
    Journal,
    JournalView,
    find_journals,
    folder_lock,
    next_group,
    now_ms,
    read_journal,
    record_run_id,
)
from pcc_dist.tracking.plots import plot_metrics
from pcc_dist.tracking.redaction import redact, redacted_copy, safe_uri, short_error
from pcc_dist.tracking.retry import RetryPolicy
from pcc_dist.tracking.uploader import Rejected, RunState, SyncStats, Uploader

logger = logging.getLogger(__name__)

# (tracking URI, pipeline folder) pairs this process has already warned about: one warning per
# outage story, even though each stage opens its own tracker.
_WARNED: set[tuple[str, str]] = set()


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


class RunRef(NamedTuple):
    """The pipeline run a stage run is nested under, as seen from the stage's tracker."""
    run_id: str


class MlflowTracker:
    """Rank-0 tracker of one MLflow run; build it with :func:`make_tracker`.

    Records go straight to MLflow while it answers and nothing is pending; otherwise they are
    appended to the journal as pending and uploaded in order when the backoff allows. Without a
    run (``start_run`` never called) it is a journal uploader, as ``sync-mlflow`` uses it.

    Attributes:
        journal_path: This run folder's journal.
        pending: Journal records not yet on the server, in order.
        online: False from a failed call until the next successful upload.
        skipped_steps: Metric points skipped because their step was already logged.
    """

    def __init__(self, run_dir: Path, uri: str | None, policy: RetryPolicy, *,
                 quiet: bool = False, lock: bool = True, sync_dir: Path | None = None):
        self.run_dir = run_dir
        self.sync_dir = sync_dir or run_dir
        self.uri = uri
        self.policy = policy
        self.quiet = quiet
        self.clock = time.monotonic
        self.journal = Journal(run_dir / JOURNAL_NAME)
        self.journal_path = path = self.journal.path
        self.view = JournalView.of(read_journal(path))
        self.pending: deque[dict[str, Any]] = deque(self.view.pending)
        self.run_ids: dict[str, str] = dict(self.view.run_ids)
        self.state_files: dict[str, set[Path]] = {}
        for start in self.view.starts.values():
            self._remember_state_files(start)
        self.stats = SyncStats()
        self.online = True
        self.next_attempt = 0.0
        self.delay = policy.first_s
        self.last_error: str | None = None
        self.key: str | None = None
        self.role = "main"
        self.parent_key: str | None = None
        self.skipped_steps = 0
        self._last_steps: dict[str, dict[str, int]] = {}
        self._params: dict[str, dict[str, str]] = {}
        self._bad_names: set[str] = set()
        self._closed = False
        self._rejected_runs: set[str | None] = set()
        self._uploader: Uploader | None = None
        self._lock = None
        if lock:
            try:
                self._lock = folder_lock(run_dir, exclusive=False)
            except BlockingIOError:
                logger.info("%s is being synced by `pcc-train sync-mlflow`; continuing", run_dir)

    # -- the run ------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The MLflow run id, or ``local-<key>`` until the run reaches the server."""
        return self.run_ids.get(self.key) or f"local-{self.key}"

    @property
    def parent(self) -> RunRef | None:
        """The pipeline run this run is nested under; closing this run also ends it."""
        if self.parent_key is None:
            return None
        return RunRef(self.run_ids.get(self.parent_key) or f"local-{self.parent_key}")

    def start_run(self, key: str, role: str, record: dict[str, Any]) -> None:
        """Journal the ``start`` record of run ``key`` and make it the run ``log_*`` write to.

        The run started before it (the pipeline run) becomes its parent. Params and last metric
        steps come from the journal and, when MLflow answers, from the server (resume).
        """
        if self.key is not None:
            self.parent_key = self.key
        self.key, self.role = key, role
        self.submit({"kind": "start", "run": key, "role": role, **record})
        self._last_steps[key] = dict(self.view.last_steps.get(key, {}))
        self._params[key] = dict(self.view.params.get(key, {}))
        state = self.server_state(key)
        if state is not None:
            last = self._last_steps[key]
            for name, step in state.last_steps.items():
                last[name] = max(step, last.get(name, step))
            self._params[key].update(state.params)

    def _names_ok(self, names, what: str) -> list[str]:
        good = []
        for name in names:
            if valid_name(name):
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
        known = self._params[self.key]
        values = {k: _as_text(flat[k])[:MAX_PARAM_VALUE] for k in self._names_ok(flat, "param")}
        values = {k: v for k, v in values.items() if known.get(k) != v}
        if values:
            known.update(values)
            self.submit({"kind": "params", "run": self.key, "params": values})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags (redacted, values cut to 8000 characters)."""
        if not self._live("set_tags"):
            return
        clean = redact({k: _as_text(v) for k, v in tags.items()})
        values = {k: clean[k][:MAX_TAG_VALUE] for k in self._names_ok(clean, "tag")}
        if values:
            self.submit({"kind": "tags", "run": self.key, "tags": values})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; keys already logged at a step >= ``step`` are skipped.

        Values may be Python numbers or one-element tensors; NaN is logged as NaN.
        """
        if not self._live("log_metrics"):
            return
        step, last = int(step), self._last_steps[self.key]
        points: dict[str, float] = {}
        for key in self._names_ok(metrics, "metric"):
            if step <= last.get(key, -math.inf):
                self.skipped_steps += 1
                logger.debug("%s step %d <= last logged step %d: skipped (replay after resume)",
                             key, step, last[key])
                continue
            try:
                points[key] = float(metrics[key])
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, metrics[key])
                continue
            last[key] = step
        if points:
            self.submit({"kind": "metrics", "run": self.key, "step": step, "metrics": points})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder. Text files containing secrets are uploaded redacted."""
        if not self._live("log_artifact"):
            return
        path = Path(path).resolve()
        if not path.exists():
            logger.warning("log_artifact: %s does not exist; not logged", path)
            return
        try:
            upload = redacted_copy(path, self.run_dir / PRIVATE_DIR / "redacted")
        except OSError as exc:
            logger.warning("log_artifact: cannot scan %s for secrets (%s); not logged", path, exc)
            return
        base = self.journal.path.parent
        stored = os.path.relpath(upload, base) if upload.is_relative_to(base) else str(upload)
        self.submit({"kind": "artifact", "run": self.key, "path": stored,
                     "artifact_path": artifact_path})

    def close(self, status: str = "FINISHED") -> None:
        """End the run (and its pipeline parent) and try once more to upload the journal.

        Also renders ``<run_dir>/metrics.png`` (loss and Pearson r curves) from the journal and
        logs it under ``plots/``. Calling close twice is harmless.
        """
        if self._closed:
            return
        if self.role != "pipeline" and self._last_steps.get(self.key):
            try:
                png = plot_metrics(self.journal_path, self.run_dir / PLOT_NAME, run_key=self.key)
                self.log_artifact(png, "plots")
            except Exception as exc:  # a plot must never fail a finished run
                logger.warning("metric plot not written: %s", short_error(exc))
        self._closed = True
        for key in filter(None, (self.key, self.parent_key)):
            self.submit({"kind": "end", "run": key, "status": status})
        # End of the stage: one more try regardless of the backoff (costs <= ~2 s if down), and
        # no time budget, since the training loop is over.
        if self.flush(force=True, budget_s=math.inf):
            self.drain_siblings(math.inf)
        elif not self.quiet:
            logger.info("%d tracking record(s) remain in %s; upload them with `pcc-train "
                        "sync-mlflow %s`", len(self.pending), self.journal.path, self.sync_dir)
        self.close_journal()

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")

    # -- journal and connection ---------------------------------------------------------------
    def uploader(self) -> Uploader:
        if self._uploader is None:
            self._uploader = Uploader(self.uri, self.policy, self.stats, self.run_ids,
                                      self._on_created)
        return self._uploader

    def _remember_state_files(self, start: dict[str, Any]) -> None:
        self.state_files.setdefault(start["run"], set()).update(
            (self.journal_path.parent / rel).resolve() for rel in start.get("state_files", ()))

    def _on_created(self, key: str, run_id: str, rec: dict[str, Any]) -> None:
        self.journal.append({"v": JOURNAL_VERSION, "kind": "created", "run": key,
                             "run_id": run_id, "t": now_ms()})
        for path in self.state_files.get(key, ()):
            record_run_id(path, key, run_id)

    def _base(self, rec: dict[str, Any]) -> dict[str, Any]:
        # Artifact paths are stored relative to the journal so a moved run folder still syncs.
        return {**rec, "_base": str(self.journal.path.parent)} if rec["kind"] == "artifact" \
            else rec

    def submit(self, rec: dict[str, Any]) -> None:
        """Send ``rec`` now if MLflow is up and nothing is pending; else journal it as pending."""
        rec = {"v": JOURNAL_VERSION, "id": self.journal.new_id(), "t": now_ms(), **rec}
        if rec["kind"] == "start":
            self._remember_state_files(rec)
        if self.pending or not self.online:
            self._add_pending(rec)
            self.flush()
            return
        try:
            self.uploader().apply([self._base(rec)], replay=False)
        except Rejected as exc:
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
                group = next_group(self.pending)
                try:
                    self.uploader().apply([self._base(r) for r in group], replay=True)
                    done.extend(r["id"] for r in group)
                    for _ in group:
                        self.pending.popleft()
                except Rejected:
                    # Find the bad record(s): the rest of the group is still good.
                    for rec in group:
                        try:
                            self.uploader().apply([self._base(rec)], replay=True)
                            done.append(rec["id"])
                        except Rejected as exc:
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
                                     "t": now_ms()})
        self.last_error = None
        self.online = True
        self.delay = self.policy.first_s
        if not self.pending and was_offline and not self.quiet:
            logger.info("MLflow at %s answers again; the journal is uploaded (%s)",
                        safe_uri(self.uri), self.journal.path)
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
                             "reason": reason, "t": now_ms()})

    def _went_offline(self, exc: BaseException) -> None:
        if self._uploader is not None:
            self._uploader.forget()
        was_online, self.online = self.online, False
        self.last_error = short_error(exc)
        self.next_attempt = self.clock() + self.delay
        story = (safe_uri(self.uri), str(self.sync_dir))
        if story not in _WARNED and not self.quiet:
            _WARNED.add(story)
            logger.warning(
                "MLflow tracking at %s is unreachable (%s). Training continues: tracking records "
                "are appended to the journal %s and uploaded in order when the server answers "
                "(retry in %.0f s, backing off to %.0f s), or later with `pcc-train sync-mlflow "
                "%s`.", safe_uri(self.uri), self.last_error, self.journal.path, self.delay,
                self.policy.max_s, self.sync_dir)
        elif not self.quiet and was_online:
            logger.info("MLflow at %s unreachable again (%s); journaling to %s",
                        safe_uri(self.uri), self.last_error, self.journal.path)
        else:
            logger.debug("MLflow still unreachable (%s); next attempt in %.0f s",
                         self.last_error, self.delay)
        self.delay = min(self.delay * 2, self.policy.max_s)

    def server_state(self, key: str) -> RunState | None:
        """Params and last steps the server holds for run ``key``; None if unknown/offline."""
        run_id = self.run_ids.get(key)
        if run_id is None or not self.online or self.pending:
            return None
        try:
            return self.uploader().run_state(run_id)
        except Exception as exc:
            self._went_offline(exc)
            return None

    def drain_siblings(self, budget_s: float) -> None:
        """Upload what other folders of this pipeline left pending (e.g. stage 1 ended during an
        outage and the server is back for stage 2). Folders a live trainer holds are skipped."""
        if not self.online or self.pending:
            return
        deadline = self.clock() + budget_s
        for journal in find_journals(self.sync_dir):
            if journal.parent == self.run_dir or self.clock() >= deadline:
                continue
            if not any(r.get("synced") is False for r in read_journal(journal)):
                continue
            try:
                lock = folder_lock(journal.parent, exclusive=True)
            except BlockingIOError:
                continue
            sibling = MlflowTracker(journal.parent, self.uri, self.policy, quiet=True,
                                    lock=False)
            try:
                sibling.flush(force=True, budget_s=max(0.0, deadline - self.clock()))
                logger.info("uploaded %d journaled record(s) of %s (%d left)",
                            sibling.stats.records, journal.parent, len(sibling.pending))
            finally:
                sibling.close_journal()
                if lock is not None:
                    lock.close()
            if not sibling.online:
                return  # down again: the sibling stays pending for later or sync-mlflow

    def close_journal(self) -> None:
        """Close the journal, release the folder lock and MLflow's HTTP settings (no upload)."""
        self.journal.close()
        if self._uploader is not None:
            self._uploader.close()
            self._uploader = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
