"""Suite-wide test setup: offline hub, GPU-marked tests skipped with a reason on CPU."""

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One toolchain for every process the suite starts: DeepSpeed builds a small op with whichever
# `ninja` comes first on PATH, and the venv's ninja (1.13) and the system's (1.11) keep
# incompatible build logs, so alternating between them rebuilt the op (~60 s) again and again.
_venv_bin = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _venv_bin:
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")
# And one build folder for that op per virtual environment: every process of the suite inherits
# it, so a fresh machine builds it once instead of once per cache folder; other jobs' builds in
# the shared ~/.cache/torch_extensions never hold our build lock; and two checkouts (whose venv
# paths differ, so each rebuilds the op) never wait on each other's lock.
_venv_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
_extensions = Path.home() / ".cache" / "pcc_dist_tests" / "torch_extensions" / _venv_key
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions))
# torch's build lock is a bare file: a rank killed while it held it (a test's timeout kill) leaves
# it behind and every later load waits forever. A build takes about a minute; a lock this old
# belongs to no live build.
_STALE_LOCK_S = 15 * 60
for _lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock"):
    try:
        if time.time() - _lock.stat().st_mtime > _STALE_LOCK_S:
            _lock.unlink()
    except OSError:
        pass  # another process removed it first


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def sqlite_mlflow_store(tmp_path_factory):
    """``(folder, uri)`` of one sqlite MLflow store per test module (creating its tables takes
    ~6 s; tests use their own experiments). MLflow caches the store per URI and fixes its default
    artifact root (``./mlruns``) against the cwd of that moment, so it is created from inside its
    tmp folder: artifacts must never land in the repository."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        MlflowClient(uri).search_experiments()
    finally:
        os.chdir(cwd)
    return folder, uri
