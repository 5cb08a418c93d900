"""Experiment tracking: MLflow on rank 0, a null tracker everywhere else.

:func:`make_tracker` is the only constructor the trainer needs. On ranks other than 0, and when
``tracking.backend == "none"``, it returns a :class:`NullTracker`, which never imports MLflow, so
those processes never open a connection to the tracking server. On rank 0 it returns an
:class:`MlflowTracker`, which talks to MLflow through ``MlflowClient`` only (no fluent
``mlflow.start_run`` global state).

What a run records:
    * params: the flattened resolved config (``stage2.lr`` ...), plus whatever the trainer passes
      (nested dicts such as the DeepSpeed config are flattened to dotted keys), each value passed
      through :func:`redact` and cut to MLflow's 6000-character limit;
    * tags: :func:`environment_tags` (package versions, world size, nodes, git commit, host),
      ``pcc.stage``, ``pcc.pipeline_id``, ``pcc.run_key``;
    * metrics with explicit steps; a step at or below the last step already logged for the same
      key is skipped, so a resumed run that replays steps cannot duplicate them;
    * artifacts: the resolved config (``config/config.yaml``), anything the trainer logs, and at
      :meth:`MlflowTracker.close` a loss / Pearson r plot (``plots/metrics.png``).

Stage link (the two-stage story):
    Each run folder ``cfg.run.output_dir`` is one *pipeline*. ``make_tracker(stage="stage1")``
    (or ``"stage2"``) opens a child run nested under a pipeline parent run (MLflow tag
    ``mlflow.parentRunId``, shown as a tree in the UI); parent and children also share the tag
    ``pcc.pipeline_id`` for search. The parent is found in ``<output_dir>/tracking.json`` and
    created on first use; a fresh (not resumed) ``stage1`` starts a new pipeline, every other
    call joins the folder's pipeline. ``make_tracker(stage=None)`` returns the pipeline run
    itself (for the final STS7 scores). An explicit ``parent_run_id`` overrides all of this.

Resume:
    :attr:`MlflowTracker.run_id` goes into the checkpoint; ``make_tracker(resume_run_id=...)``
    re-attaches to that run (status back to RUNNING), skips params already logged with the same
    value (MLflow params are immutable; a changed value is kept as tag
    ``pcc.param_changed.<key>``) and continues metrics after the last logged step. While a run
    has not reached the server yet, ``run_id`` is ``local-<key>``; it is accepted as
    ``resume_run_id`` too.

Outage:
    Every record (run start/end, params, tags, metrics, artifact paths) is appended to the
    journal ``<run_dir>/mlflow_journal.jsonl``, one JSON object per line. When a call to MLflow
    fails for any reason other than MLflow rejecting the record itself, the tracker logs ONE
    warning naming the URI and the journal, marks the record pending and keeps going; the
    training loop never sees an exception. Pending records are retried in order with
    exponential backoff (5 s, 10 s, ... capped at 300 s); between attempts a call costs only a
    journal append. MLflow's own HTTP client would retry 7 times over ~4 minutes and wait 120 s
    per request, so an open tracker sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=2`` from connect to close (MLflow has no per-client setting):
    a dead server costs at most ~2 s per attempt.
    The warning is given once per tracking URI and pipeline folder in a process, even though
    each stage opens its own journal. A stage that starts (or ends) while MLflow answers also
    uploads what earlier stage folders of the pipeline left pending.
    ``pcc-train sync-mlflow RUN_DIR`` (:func:`sync_main`) uploads journals later; it is
    idempotent (metric steps at or below the server's last step are skipped, params compared,
    runs found again by their ``pcc.run_key`` tag) and marks what it uploaded.

Journal format (version 1), one JSON object per line:
    ``{"v": 1, "id": "<session>-<n>", "kind": K, "run": RUN_KEY, "t": epoch_ms,
    "synced": bool, ...}`` with ``K`` one of ``start`` (experiment, name, tags, parent),
    ``params``, ``tags``, ``metrics`` (``step``, ``metrics``), ``artifact`` (``path`` relative to
    the journal's folder when inside it, ``artifact_path``) and ``end`` (``status``).
    Bookkeeping lines: ``created`` (``run`` -> ``run_id``), ``synced`` and ``rejected``
    (``ids`` of records that are done). A record is pending when ``synced`` is false and no
    ``synced``/``rejected`` line lists its id.

Environment knobs (seconds): ``PCC_MLFLOW_RETRY_S`` (first retry, 5), ``PCC_MLFLOW_RETRY_MAX_S``
(cap, 300), ``PCC_MLFLOW_HTTP_TIMEOUT_S`` (per request, 2), ``PCC_GIT_COMMIT`` (commit tag when the
package is not a git checkout).

The tracker is not thread-safe: call it from the training loop's thread.

Modules, in dependency order:

* ``constants``: run-folder file names, the journal version, MLflow's limits.
* ``redaction``: :func:`redact`, :func:`redact_text`, redacted copies of artifacts.
* ``environment``: :func:`environment_tags`.
* ``journal``: :func:`read_journal`, the journal writer, ``tracking.json``, the folder lock.
* ``retry``: :class:`RetryPolicy` (backoff, MLflow's HTTP timeout and retries).
* ``uploader``: applies journal records to MLflow (the only module that imports it).
* ``plots``: :func:`metric_history`, :func:`plot_metrics`.
* ``tracker``: :class:`MlflowTracker`: the journal, the outage state machine, the run.
* ``factory``: :func:`make_tracker`, the :class:`Tracker` protocol, :class:`NullTracker`.
* ``sync``: :func:`sync_main` (``pcc-train sync-mlflow``).
"""

from pcc_dist.tracking.constants import JOURNAL_NAME
from pcc_dist.tracking.environment import environment_tags
from pcc_dist.tracking.factory import NullTracker, Tracker, make_tracker
from pcc_dist.tracking.journal import read_journal
from pcc_dist.tracking.plots import metric_history, plot_metrics
from pcc_dist.tracking.redaction import REDACTED, redact, redact_text
from pcc_dist.tracking.sync import sync_main
from pcc_dist.tracking.tracker import MlflowTracker

__all__ = [
    "JOURNAL_NAME",
    "REDACTED",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "environment_tags",
    "make_tracker",
    "metric_history",
    "plot_metrics",
    "read_journal",
    "redact",
    "redact_text",
    "sync_main",
]
