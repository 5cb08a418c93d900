"""Retry policy: how hard the tracker tries MLflow, and how long one call may take."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


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
