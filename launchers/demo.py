"""`make demo`: Pcc-tuning end to end on this machine, with real model and data.

1. evaluates the offline all-MiniLM-L6-v2 on STS7 (SentEval protocol);
2. runs stage-2 Pcc-tuning on the de-contaminated STS-B + SICK-R train set through the DeepSpeed
   engine, tracked in MLflow (local sqlite);
3. evaluates again, prints a before/after table, writes ``runs/demo/results.json`` and
   ``runs/demo/demo.png`` (training loss and batch Pearson r per step, STS7 before/after);
4. says how to open the MLflow UI on the run.

Usage: ``python launchers/demo.py [key=value ...]``, overrides of
``launchers/configs/demo_minilm.yaml``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from pcc_dist.cli import configure_logging
from pcc_dist.config import ConfigError, load_config
from pcc_dist.data import load_sts7, resolve_data_root
from pcc_dist.evaluation import evaluate_sts
from pcc_dist.modeling import load_embedder
from pcc_dist.trainer import run_training

CONFIG = Path(__file__).resolve().parent / "configs" / "demo_minilm.yaml"
SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def comparison_table(before: dict[str, float], after: dict[str, float]) -> str:
    """Rows before / after / delta over the tasks plus the average, x100."""
    tasks = list(before)
    names = [SHORT.get(t, t) for t in tasks] + ["Avg."]
    rows = {
        "before": [before[t] for t in tasks] + [sum(before.values()) / len(before)],
        "after": [after[t] for t in tasks] + [sum(after.values()) / len(after)],
    }
    rows["delta"] = [a - b for a, b in zip(rows["after"], rows["before"], strict=True)]
    lines = [f"{'':8}" + "".join(f"{n:>9}" for n in names)]
    for label, values in rows.items():
        sign = "+" if label == "delta" else ""
        lines.append(f"{label:8}" + "".join(f"{v:>{sign}9.2f}" for v in values))
    return "\n".join(lines)


def plot(journal: Path, before: dict[str, float], after: dict[str, float], out: Path) -> None:
    """Loss and batch Pearson r over steps, and STS7 bars before/after, in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pcc_dist.tracking import metric_history

    series = next(iter(metric_history(journal).values()), {})
    figure = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(figure)
    for index, (key, title) in enumerate([("train/loss", "training loss (1 - r)"),
                                          ("train/pearson_r", "batch Pearson r")]):
        axis = figure.add_subplot(1, 3, index + 1)
        points = sorted(series.get(key, []))
        axis.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axis = figure.add_subplot(1, 3, 3)
    names = [SHORT.get(t, t) for t in before] + ["Avg."]
    b = list(before.values()) + [sum(before.values()) / len(before)]
    a = list(after.values()) + [sum(after.values()) / len(after)]
    xs = range(len(names))
    axis.bar([x - 0.2 for x in xs], b, width=0.4, label="before")
    axis.bar([x + 0.2 for x in xs], a, width=0.4, label="after Pcc-tuning")
    axis.set_xticks(list(xs), names, rotation=30)
    axis.set_ylim(min(b + a) - 5, max(b + a) + 3)
    axis.set_title("STS7 Spearman x100")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    configure_logging()
    log = logging.getLogger("demo")
    try:
        cfg = load_config(CONFIG, argv)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.output_dir)
    if run_dir.exists():
        # The demo is a fresh run each time; a resumed one would skip the training it shows.
        log.info("removing the previous demo run %s", run_dir)
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    tasks = load_sts7(resolve_data_root(cfg.data.root))

    log.info("[1/3] STS7 of the untouched %s", cfg.model.name_or_path)
    before = evaluate_sts(load_embedder(cfg.model), tasks, batch_size=cfg.eval.batch_size)

    log.info("[2/3] stage-2 Pcc-tuning through DeepSpeed (progress below)")
    training = run_training(cfg)
    after = training["sts"]["spearman"]

    log.info("[3/3] results")
    document = {
        "model": cfg.model.name_or_path,
        "before": before.to_json(),
        "after": training["sts"],
        "training": training["stages"],
        "seconds": time.perf_counter() - started,
    }
    (run_dir / "results.json").write_text(json.dumps(document, indent=2))
    plot(run_dir / "stage2" / "mlflow_journal.jsonl", before.spearman, after,
         run_dir / "demo.png")
    print("\nSTS7 Spearman x100, SentEval protocol:\n" + comparison_table(before.spearman, after))
    print(f"\nwrote {run_dir / 'results.json'} and {run_dir / 'demo.png'} "
          f"({document['seconds'] / 60:.1f} min)")
    uri = cfg.tracking.tracking_uri or "sqlite:///mlflow.db"
    print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000\n"
          f"           then open http://127.0.0.1:5000, experiment '{cfg.tracking.experiment}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
