"""The rank-0 tracker: one MLflow run, fed through the session's journal."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcc_dist.tracking.constants import (
    _VALID_NAME,
    MAX_KEY,
    MAX_PARAM_VALUE,
    MAX_TAG_VALUE,
    PLOT_NAME,
    PRIVATE_DIR,
)
from pcc_dist.tracking.plots import plot_metrics
from pcc_dist.tracking.redaction import _redacted_copy, _short_error, redact

if TYPE_CHECKING:
    from pcc_dist.tracking.session import _Session

logger = logging.getLogger(__name__)


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
