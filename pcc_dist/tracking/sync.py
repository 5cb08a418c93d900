"""``pcc-train sync-mlflow RUN_DIR``: upload journals left pending by an outage."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pcc_dist.tracking.constants import JOURNAL_NAME, STATE_NAME
from pcc_dist.tracking.journal import find_journals, folder_lock, load_state
from pcc_dist.tracking.redaction import REDACTED, safe_uri
from pcc_dist.tracking.retry import RetryPolicy
from pcc_dist.tracking.tracker import MlflowTracker
from pcc_dist.tracking.uploader import import_mlflow


def sync_main(argv: list[str] | None = None) -> int:
    """``pcc-train sync-mlflow RUN_DIR [--tracking-uri URI] [--dry-run]``.

    Uploads every pending record of every journal under ``RUN_DIR`` (the run folder and its
    stage folders) in order, and marks them synced. Safe to repeat: runs are found again by
    their ``pcc.run_key`` tag, params already present are skipped and metric steps at or below
    the server's last step are skipped, so nothing is duplicated.

    Returns:
        0 when nothing is left to upload, 1 when the server could not be reached or a trainer
        is still writing the folder, 2 when there is no journal.
    """
    parser = argparse.ArgumentParser(
        prog="pcc-train sync-mlflow",
        description="Upload MLflow records journaled while the tracking server was unreachable.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (cfg.run.output_dir)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: the one the run used (tracking.json), "
                             "then $MLFLOW_TRACKING_URI, then MLflow's default")
    parser.add_argument("--dry-run", action="store_true", help="count pending records only")
    args = parser.parse_args(argv)
    root = Path(args.run_dir).resolve()
    journals = find_journals(root)
    if not journals:
        print(f"pcc-train sync-mlflow: no {JOURNAL_NAME} under {root}; pass the run folder "
              "(cfg.run.output_dir).", file=sys.stderr)
        return 2
    if not args.dry_run:
        try:
            import_mlflow()
        except ImportError as exc:
            print(f"pcc-train sync-mlflow: {exc}", file=sys.stderr)
            return 2
    status = 0
    # A person waits for this command: longer timeouts and a few HTTP retries are fine here.
    policy = RetryPolicy(http_timeout_s=30, http_retries=2)
    for journal in journals:
        folder = journal.parent
        uri = args.tracking_uri or load_state(folder / STATE_NAME).get("tracking_uri")
        if not uri or REDACTED in uri or uri == safe_uri(None):
            uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        try:
            lock = folder_lock(folder, exclusive=True)
        except BlockingIOError:
            print(f"{journal}: a running trainer is writing this folder; it uploads its own "
                  "journal when the server answers. Skipped.", file=sys.stderr)
            status = 1
            continue
        try:
            session = MlflowTracker(folder, uri, policy, quiet=True, lock=False)
            pending = len(session.pending)
            if pending == 0 or args.dry_run:
                print(f"{journal}: {pending} pending record(s)"
                      + ("" if pending else "; nothing to upload"))
                continue
            try:
                ok = session.flush(force=True, budget_s=math.inf)
            finally:
                session.close_journal()
            stats = session.stats
            print(f"{journal}: uploaded {stats.records} record(s) ({stats.metric_points} metric "
                  f"points; {stats.skipped_points} already on the server) to {safe_uri(uri)}; "
                  f"{len(session.pending)} left" + (f"; {stats.rejected} rejected"
                                                    if stats.rejected else ""))
            if not ok:
                print(f"{journal}: MLflow at {safe_uri(uri)} is unreachable: "
                      f"{session.last_error}", file=sys.stderr)
                status = 1
        finally:
            if lock is not None:
                lock.close()
    return status
