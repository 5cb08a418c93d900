"""The tracker interface the trainer calls, and the null tracker of ranks other than 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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
