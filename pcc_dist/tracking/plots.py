"""Plots: loss and Pearson r curves drawn from a journal (matplotlib imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pcc_dist.tracking.constants import JOURNAL_NAME
from pcc_dist.tracking.journal import read_journal

DEFAULT_PLOT_KEYS = ("train/loss", "train/pearson_r")


def metric_history(path: Path, run_key: str | None = None) -> dict[str, dict[str, list]]:
    """``{run label: {metric key: [(step, value), ...]}}`` from a journal file."""
    records = read_journal(path)
    labels = {r["run"]: r.get("role") or r["run"][:8] for r in records if r["kind"] == "start"}
    out: dict[str, dict[str, list]] = {}
    for rec in records:
        if rec["kind"] != "metrics" or (run_key is not None and rec["run"] != run_key):
            continue
        series = out.setdefault(labels.get(rec["run"], rec["run"][:8]), {})
        for key, value in rec["metrics"].items():
            series.setdefault(key, []).append((rec["step"], value))
    return out


def plot_metrics(journal_or_history: str | Path | Mapping[str, Any], out_png: str | Path, *,
                 keys: list[str] | None = None, run_key: str | None = None) -> Path:
    """Loss and Pearson r curves (and eval curves) as a PNG, drawn with matplotlib's Agg canvas.

    Args:
        journal_or_history: A journal file (or the folder holding one), or a history
            ``{"train/loss": [(step, value), ...], ...}``, or ``{label: history}`` for several
            runs (e.g. ``{"stage1": {...}, "stage2": {...}}``).
        out_png: Where to write the image.
        keys: Metric keys to draw, one panel each; default ``train/loss``, ``train/pearson_r``
            and every ``eval/`` key with at least two points.
        run_key: Only this run of the journal.

    Returns:
        ``out_png`` as a Path.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("metric plots need matplotlib: pip install 'pcc-dist[plots]'") from exc

    if isinstance(journal_or_history, Mapping):
        values = list(journal_or_history.values())
        runs = dict(journal_or_history) if values and isinstance(values[0], Mapping) else \
            {"": dict(journal_or_history)}
    else:
        path = Path(journal_or_history)
        runs = metric_history(path / JOURNAL_NAME if path.is_dir() else path, run_key)
    if keys is None:
        present = {k for series in runs.values() for k, pts in series.items()}
        keys = [k for k in DEFAULT_PLOT_KEYS if k in present] + sorted(
            k for k in present if k.startswith("eval/")
            and max(len(s.get(k, ())) for s in runs.values()) >= 2)
    fig = Figure(figsize=(7, 2.6 * max(1, len(keys))), dpi=100)
    FigureCanvasAgg(fig)
    if not keys:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        ax.set_axis_off()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, i + 1)
        for label, series in runs.items():
            points = sorted(series.get(key, ()))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=label or None,
                        marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if any(label for label in runs):
            ax.legend(loc="best", fontsize="small")
    fig.axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
