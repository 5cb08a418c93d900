"""Names and limits the tracking modules share: run-folder file names and MLflow's limits."""

from __future__ import annotations

import posixpath
import re

MLFLOW_PIN = "mlflow==3.17.2"
JOURNAL_NAME = "mlflow_journal.jsonl"
STATE_NAME = "tracking.json"
LOCK_NAME = ".mlflow_journal.lock"
PRIVATE_DIR = ".tracking"
PLOT_NAME = "metrics.png"
JOURNAL_VERSION = 1

# Limits of MLflow 3.17 (mlflow/utils/validation.py); copied so that NullTracker code paths and
# the journal never import MLflow. We cut values ourselves so the journal holds exactly what the
# server stores, which keeps the "same value already logged" comparison on resume exact.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
# MLflow names: alphanumerics, _ - . space / and : (validate_param_and_metric_name, non-Windows).
_VALID_NAME = re.compile(r"^[/\w.\- :]+$")


def valid_name(name: str) -> bool:
    """Whether MLflow accepts ``name`` as a param, tag or metric key."""
    return (0 < len(name) <= MAX_KEY and bool(_VALID_NAME.match(name))
            and posixpath.normpath(name) == name and not name.startswith(("/", "..")))
