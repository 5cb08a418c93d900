#!/usr/bin/env bash
# A shared MLflow tracking server for pcc_dist runs (what `tracking.tracking_uri=http://HOST:PORT`
# points at). It binds to 127.0.0.1 unless PCC_MLFLOW_HOST says otherwise: the server has no
# authentication, so exposing it on a cluster network is a deliberate choice.
#
#   launchers/mlflow_server.sh                           # http://127.0.0.1:5000, runs/mlflow.db
#   PCC_MLFLOW_HOST=0.0.0.0 PCC_MLFLOW_PORT=5001 launchers/mlflow_server.sh --workers 2
#
# Settings: PCC_MLFLOW_HOST (127.0.0.1), PCC_MLFLOW_PORT (5000), PCC_MLFLOW_STORE (the demo's
# sqlite:///runs/mlflow.db), PCC_MLFLOW_ARTIFACTS (runs/mlartifacts); further arguments go to
# `mlflow server`.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=${PCC_MLFLOW_HOST:-127.0.0.1}
PORT=${PCC_MLFLOW_PORT:-5000}
STORE=${PCC_MLFLOW_STORE:-sqlite:///runs/mlflow.db}
ARTIFACTS=${PCC_MLFLOW_ARTIFACTS:-runs/mlartifacts}
PYTHON=${PYTHON:-.venv/bin/python}

[[ -n "${PCC_MLFLOW_STORE:-}" ]] || mkdir -p runs
mkdir -p "$ARTIFACTS"
echo "mlflow server: http://$HOST:$PORT (store $STORE, artifacts $ARTIFACTS)" >&2
exec "$PYTHON" -m mlflow server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" "$@"
