"""Session: one journal, one connection, the outage state machine."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcc_dist.tracking.constants import JOURNAL_NAME, JOURNAL_VERSION, MAX_METRICS_PER_BATCH
from pcc_dist.tracking.journal import (
    _find_journals,
    _Journal,
    _JournalView,
    _load_state,
    _lock,
    _now_ms,
    _save_state,
    read_journal,
)
from pcc_dist.tracking.redaction import _safe_uri, _short_error
from pcc_dist.tracking.retry import RetryPolicy
from pcc_dist.tracking.uploader import SyncStats, _Rejected, _RunState, _Uploader

if TYPE_CHECKING:
    from pcc_dist.tracking.mlflow_tracker import MlflowTracker

logger = logging.getLogger(__name__)


# (tracking URI, pipeline folder) pairs this process has already warned about: one warning per
# outage story, even though each stage opens its own session.
_WARNED: set[tuple[str, str]] = set()


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
