"""Journal and state files: the append-only record of every tracking call, ``tracking.json``
and the folder lock that keeps ``sync-mlflow`` and a live trainer apart."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcc_dist.tracking.constants import JOURNAL_NAME, LOCK_NAME, MAX_METRICS_PER_BATCH

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; sync-mlflow then trusts the user.
    fcntl = None

logger = logging.getLogger(__name__)


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's timestamp unit."""
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
class JournalView:
    """What a journal says: pending records, known run ids, and per-run history."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)
    last_steps: dict[str, dict[str, int]] = field(default_factory=dict)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    starts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> JournalView:
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


class Journal:
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


def load_state(path: Path) -> dict[str, Any]:
    """The JSON object in ``tracking.json`` at ``path``; ``{}`` if missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(path: Path, data: dict[str, Any]) -> None:
    """Write ``tracking.json`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def record_run_id(path: Path, key: str, run_id: str) -> None:
    """Write the MLflow ``run_id`` of run ``key`` into the ``tracking.json`` at ``path``."""
    state = load_state(path)
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
            save_state(path, state)


def next_group(pending) -> list[dict[str, Any]]:
    """The records one upload call takes from the front of ``pending``: one record, or the
    consecutive metrics records of one run up to MLflow's 1000 metrics per ``log_batch``."""
    first = pending[0]
    group = [first]
    if first["kind"] == "metrics":
        points = len(first["metrics"])
        for rec in list(pending)[1:]:
            if rec["kind"] != "metrics" or rec["run"] != first["run"] or \
                    points + len(rec["metrics"]) > MAX_METRICS_PER_BATCH:
                break
            group.append(rec)
            points += len(rec["metrics"])
    return group


def folder_lock(run_dir: Path, exclusive: bool):
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


def find_journals(root: Path) -> list[Path]:
    """Journals of the run folder ``root`` and its stage folders, the run folder's first."""
    found = [root / JOURNAL_NAME] if (root / JOURNAL_NAME).is_file() else []
    # The pipeline folder first, then stage folders: parents are created before children.
    found += sorted(p for p in root.rglob(JOURNAL_NAME) if p.parent != root)
    return found
