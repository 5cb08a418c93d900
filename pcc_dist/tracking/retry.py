"""Retry policy: how hard the tracker tries MLflow, and how long one call may take."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the tracker tries, and how long a call may take.

    Attributes:
        first_s: Wait after the first failure; doubled after each failed attempt.
        max_s: Cap of the wait (5 min: a returning server is noticed within 5 min).
        http_timeout_s: Per-request timeout of every MLflow call (MLflow reads it as int); for
            an upload it bounds each socket operation, not the whole transfer.
        http_retries: MLflow HTTP retries per call (0: our backoff does the retrying).
        flush_budget_s: Time one training-loop call may spend uploading a backlog; the rest
            continues on the next calls, in order.
    """

    first_s: float = 5.0
    max_s: float = 300.0
    http_timeout_s: int = 2
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


    def set_mlflow_http_limits(self) -> dict[str, str | None]:
        """Make MLflow HTTP calls use this policy's timeout and retry count until
        :func:`restore_env` is given the returned previous values.

        MLflow 3.17 reads both from the environment at each request and offers no per-client
        setting, so a tracker sets them once when it connects and restores them when it closes
        (not around each call).
        """
        values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.http_retries),
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.http_timeout_s)}
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        return saved


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back environment variables as ``saved`` holds them (None: unset)."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
