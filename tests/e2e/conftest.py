"""Shared e2e fixtures."""

import pytest
from _mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A fresh `mlflow server` on 127.0.0.1 per test module, always stopped."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    try:
        yield srv
    finally:
        srv.stop()
