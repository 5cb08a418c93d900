"""Peak memory and time of a training step with and without the gradient cache.

Question: does the gradient cache make the memory of a step independent of the batch size, and
what does the second forward cost? Each configuration runs in a fresh interpreter (so one run's
heap cannot leak into another's peak) through the real training path: ``build_engine`` (DeepSpeed
ZeRO-3, one CPU rank, torch AdamW) and :class:`pcc_dist.gradcache.GradCache` on stage-1 InfoNCE
with hard negatives (three views per example), on a small random Llama.

Per configuration: one warm-up step (optimizer states and DeepSpeed buffers are allocated on the
first step), then the peak-RSS counter is reset (``/proc/self/clear_refs``, Linux) and ``STEPS``
steps are measured: RSS before them (baseline), peak RSS during them
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and the median step time.

Acceptance: peak RSS at global batch 512 / peak RSS at 32, both at chunk 16, must be <= 1.3.

Usage::

    python benchmarks/gradcache_memory.py          # -> benchmarks/results/gradcache_memory.json
    python benchmarks/gradcache_memory.py --quick  # batches 32 and 128, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import machine_facts, write_result  # noqa: E402

# A Llama small enough for a 2-core CPU and large enough that activations dominate a step:
# autograd keeps about 0.8 MB per 32-token sequence (2 layers x 32 tokens x ~3k floats), so an
# un-cached batch of 512 x 3 views holds ~1.2 GB of activations (measured on the 2-core machine:
# peak 3.8 GiB without the cache, 0.86 GiB with chunks of 16, 0.79 GiB for a batch of 32).
MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000,
         "max_position_embeddings": 64}
SEQ_LEN = 32
CHUNK = 16
STEPS = 2
TIMING_REPS = 3
LIMIT = 1.3


def _rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Embedder:
    """Last-token pooling over a Llama; built inside the child so imports stay out of the parent."""

    @staticmethod
    def build():
        import torch
        from torch import nn
        from transformers import LlamaConfig, LlamaModel

        class LastToken(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.backbone = LlamaModel(LlamaConfig(**MODEL))

            def forward(self, input_ids, attention_mask):
                hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
                return hidden[:, -1]

        return LastToken()


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    from pcc_dist.config import load_config
    from pcc_dist.engine import build_engine
    from pcc_dist.gradcache import GradCache
    from pcc_dist.losses import InfoNCELoss

    batch, chunk = spec["global_batch"], spec["chunk"]
    cfg = load_config(None, [f"stage1.global_batch_size={batch}",
                             f"stage1.gradcache_chunk_size={chunk}", "stage1.warmup_steps=0",
                             "train.deepspeed_config=zero3"])
    model = _Embedder.build()
    engine = build_engine(model, cfg, cfg.stage1, total_steps=2 * (STEPS + TIMING_REPS) + 2)
    engine.train()
    loss_module = InfoNCELoss(temperature=0.05, kernel="torch")
    generator = torch.Generator().manual_seed(1)
    views = [{"input_ids": torch.randint(4, MODEL["vocab_size"], (batch, SEQ_LEN),
                                         generator=generator),
              "attention_mask": torch.ones(batch, SEQ_LEN, dtype=torch.long)} for _ in range(3)]
    cache = GradCache(engine, chunk)

    def step() -> float:
        started = time.perf_counter()
        cache.run(engine.module, views, lambda e: loss_module(e[0], e[1], e[2]))
        engine.step()
        return time.perf_counter() - started

    if spec.get("timing"):
        # Side by side in one process: alternate cached and plain steps on the same batch, so
        # that load from other processes on the machine hits both alike.
        plain = GradCache(engine, 0)
        times: dict[str, list[float]] = {"cache": [], "no_cache": []}
        for rep in range(spec["timing"] + 1):
            for name, runner in (("cache", cache), ("no_cache", plain)):
                started = time.perf_counter()
                runner.run(engine.module, views, lambda e: loss_module(e[0], e[1], e[2]))
                engine.step()
                if rep:  # rep 0 warms both paths up
                    times[name].append(time.perf_counter() - started)
        medians = {k: statistics.median(v) for k, v in times.items()}
        return {"global_batch": batch, "chunk": chunk,
                "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "median_seconds": {k: round(v, 3) for k, v in medians.items()},
                "cache_vs_no_cache": round(medians["cache"] / medians["no_cache"], 3)}

    warmup_seconds = step()
    baseline = _rss_mib()
    reset = _reset_peak()
    seconds = [step() for _ in range(STEPS)]
    peak = _peak_mib()
    return {"global_batch": batch, "chunk": chunk, "baseline_rss_mib": round(baseline, 1),
            "peak_rss_mib": round(peak, 1), "step_increase_mib": round(peak - baseline, 1),
            "peak_counter_reset": reset, "warmup_step_seconds": round(warmup_seconds, 3),
            "step_seconds": [round(s, 3) for s in seconds],
            "median_step_seconds": round(statistics.median(seconds), 3)}


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent),
                                                        os.environ.get("PYTHONPATH")])))
    env.pop("RANK", None)  # a single-rank job, whatever the caller's environment
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 32 and 128 (smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    small, large = 32, (128 if args.quick else 512)
    load_before = os.getloadavg()
    runs = []
    for batch, chunk in [(small, CHUNK), (large, CHUNK), (small, 0), (large, 0)]:
        spec = {"global_batch": batch, "chunk": chunk, "threads": args.threads}
        result = run_child(spec, args.timeout)
        print(f"memory: batch {batch:4d} chunk {chunk:2d}: peak {result['peak_rss_mib']:8.1f} "
              f"MiB (baseline {result['baseline_rss_mib']:.1f})", flush=True)
        runs.append(result)
    timing = []
    for batch in (small, large):
        spec = {"global_batch": batch, "chunk": CHUNK, "threads": args.threads,
                "timing": TIMING_REPS}
        result = run_child(spec, args.timeout)
        print(f"time: batch {batch:4d}: cache {result['median_seconds']['cache']:.2f} s, no "
              f"cache {result['median_seconds']['no_cache']:.2f} s", flush=True)
        timing.append(result)
    by = {(r["global_batch"], r["chunk"]): r for r in runs}
    cached_small, cached_large = by[(small, CHUNK)], by[(large, CHUNK)]
    ratio = cached_large["peak_rss_mib"] / cached_small["peak_rss_mib"]
    document = {
        "benchmark": "gradcache_memory",
        "question": f"peak RSS of a step at global batch {large} vs {small} with gradient-cache "
                    f"chunk {CHUNK}, and the time cost of the cache",
        "machine": machine_facts(),
        "load_average_1m": {"before": round(load_before[0], 2),
                            "after": round(os.getloadavg()[0], 2)},
        "setup": {"model": dict(MODEL, type="llama", params_trainable="all"),
                  "sequence_length": SEQ_LEN, "loss": "InfoNCE, hard negatives (3 views)",
                  "engine": "DeepSpeed ZeRO-3 (ds_configs/zero3.json), 1 CPU rank, torch AdamW",
                  "memory_steps": STEPS, "timing_reps": TIMING_REPS, "threads": args.threads,
                  "peak_method": "ru_maxrss after resetting the peak with /proc/self/clear_refs; "
                                 "one fresh process per configuration"},
        "memory_runs": runs,
        "memory": {
            f"peak_ratio_{large}_vs_{small}_chunk{CHUNK}": round(ratio, 3),
            f"step_increase_ratio_{large}_vs_{small}_chunk{CHUNK}": round(
                cached_large["step_increase_mib"] / max(cached_small["step_increase_mib"], 1.0),
                3),
            f"peak_ratio_{large}_vs_{small}_no_cache": round(
                by[(large, 0)]["peak_rss_mib"] / by[(small, 0)]["peak_rss_mib"], 3),
            "limit": LIMIT,
            "passes": ratio <= LIMIT,
        },
        "time_runs": timing,
        "time": {f"cache_vs_no_cache_batch{r['global_batch']}": r["cache_vs_no_cache"]
                 for r in timing},
    }
    name = "gradcache_memory_quick" if args.quick else "gradcache_memory"
    path = write_result(name, document)
    print(f"peak ratio {ratio:.3f} (limit {LIMIT}); wrote {path}")
    return 0 if ratio <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
