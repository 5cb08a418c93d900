"""Loss layer benchmark: our chunked/closed-form losses vs naive materialised autograd versions.

Cases (fp32, forward + backward, one process, this machine's CPU):

- ``infonce``: 8,192 anchors against 16,384 candidates (8,192 positives + 8,192 hard negatives),
  D = 1,024, τ = 0.05. Ours: :func:`pcc_dist.losses.infonce_reference` (tiled, online
  log-sum-exp, tiles recomputed in backward). Naive: ``F.normalize`` + the full [8,192 × 16,384]
  logit matrix + ``F.cross_entropy`` (what contrastive trainers do).
  Issue 4 asks for peak extra memory ≤ 10% of naive at ≤ 1.5× its time.
- ``pearson``: N = 65,536 pairs, D = 4,096. Ours: :func:`pcc_dist.losses.pearson_reference`
  (row-chunked, closed-form backward). Naive: ``F.cosine_similarity`` + the Pearson formula through
  autograd.

How it is measured, honestly on a CPU:

- Every run is a fresh subprocess (``--worker``), so allocator caches and earlier peaks of one
  variant never leak into the other. Runs alternate (ours, naive, naive, ours, ...) so a load
  spike from another process on this shared 2-core machine hits both sides.
- Memory: the kernel's peak-RSS counter (VmHWM) is reset through ``/proc/self/clear_refs`` after
  the inputs are allocated and touched; "peak extra" is VmHWM − VmRSS at that point, i.e. every byte
  the forward + backward needed beyond the inputs, gradients included (both sides produce the same
  gradients; their size is recorded separately as ``grad_bytes``). Where clear_refs is refused, the
  fallback is ru_maxrss − RSS after allocation (recorded in ``memory_method``).
- Time: wall clock of forward + backward after a small-shape warm-up in the same process. The
  headline ratio uses each side's median; best-run ratios are recorded too.
- Both sides' loss values are recorded and compared, so a win cannot come from computing
  something else.

On CUDA the script adds Triton kernel rows (time, ``torch.cuda.max_memory_allocated``); on CPU
they are skipped with the reason recorded in the JSON.

Usage:
    python benchmarks/losses.py [--repeats 5] [--threads N] [--quick | --size-divisor K]

Writes ``benchmarks/results/losses.json`` (``--quick``: tiny shapes, ``losses_quick.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_facts, write_result  # noqa: E402

SHAPES = {
    # chunk_size 2,048 = the library default (InfoNCELoss / infonce_reference).
    "infonce": {"anchors": 8192, "dim": 1024, "temperature": 0.05, "chunk_size": 2048},
    "pearson": {"pairs": 65536, "dim": 4096},
}
QUICK_SHAPES = {
    "infonce": {"anchors": 512, "dim": 64, "temperature": 0.05, "chunk_size": 128},
    "pearson": {"pairs": 4096, "dim": 256},
}
VARIANTS = ("ours", "naive")
ACCEPTANCE = {"infonce": {"max_memory_ratio": 0.10, "max_time_ratio": 1.5}}
WORKER_TIMEOUT = 1800  # seconds per subprocess; a full-size naive Pearson run takes ~1 minute


# --------------------------------------------------------------------------------------------------
# Worker side: one variant, one measurement, in a fresh process
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> str:
    """Reset VmHWM to the current RSS; returns the memory method used."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        return "ru_maxrss (peak could not be reset; includes earlier peaks of this process)"


def _peak_kib(method: str) -> int:
    if method.startswith("VmHWM"):
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _infonce_fns(shape):
    import torch
    import torch.nn.functional as F

    from pcc_dist.losses import infonce_reference

    tau, chunk = shape["temperature"], shape["chunk_size"]

    def ours(a, p, h):
        return infonce_reference(a, p, h, temperature=tau, chunk_size=chunk)

    def naive(a, p, h):
        logits = F.normalize(a, dim=1) @ F.normalize(torch.cat([p, h]), dim=1).T / tau
        return F.cross_entropy(logits, torch.arange(a.shape[0]))

    def inputs(scale):
        rows, dim = max(1, shape["anchors"] // scale), max(1, shape["dim"] // scale)
        return [torch.empty(rows, dim).normal_().requires_grad_() for _ in range(3)]

    return {"ours": ours, "naive": naive}, inputs


def _pearson_fns(shape):
    import torch
    import torch.nn.functional as F

    from pcc_dist.losses import pearson_reference

    def ours(a, b, y):
        return pearson_reference(a, b, y).loss

    def naive(a, b, y):
        x = F.cosine_similarity(a, b, dim=1)
        xc, yc = x - x.mean(), y - y.mean()
        return 1 - (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())

    def inputs(scale):
        rows, dim = max(2, shape["pairs"] // scale), max(1, shape["dim"] // scale)
        a = torch.empty(rows, dim).normal_()
        b = a.mul(0.5).add_(torch.empty(rows, dim).normal_())
        # Gold scores follow the cosines plus noise, so r ≈ 0.7 like a half-trained model's
        # (computed in row chunks; these temporaries are freed before the peak is reset).
        with torch.no_grad():
            cos = torch.cat(
                [
                    F.cosine_similarity(a[i : i + 4096], b[i : i + 4096], dim=1)
                    for i in range(0, rows, 4096)
                ]
            )
        y = (cos - cos.mean()) / cos.std() + torch.empty(rows).normal_()
        return [a.requires_grad_(), b.requires_grad_(), y.add_(2.5).clamp_(0, 5)]

    return {"ours": ours, "naive": naive}, inputs


def run_worker(case: str, variant: str, shape: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    fns, make_inputs = (_infonce_fns if case == "infonce" else _pearson_fns)(shape)
    fn = fns[variant]
    # Warm-up at 1/16 of the size: thread pools, allocator, first-call dispatch.
    warm = make_inputs(16)
    fn(*warm).backward()
    del warm
    # Same seed in every worker: both variants see identical inputs (their losses are compared).
    torch.manual_seed(0)
    inputs = make_inputs(1)
    gc.collect()
    method = _reset_peak()
    base_kib = _status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = fn(*inputs)
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kib = _peak_kib(method)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs if t.grad is not None)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return {
        "variant": variant,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_extra_bytes": max(0, peak_kib - base_kib) * 1024,
        "grad_bytes": grad_bytes,
        "input_bytes": input_bytes,
        "loss": loss.item(),
        "memory_method": method,
    }


# --------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------


def _spawn(case: str, variant: str, shape: dict[str, Any], threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", case, variant, json.dumps(shape), str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{variant} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    peaks = [r["peak_extra_bytes"] for r in runs]
    return {
        "median_seconds": statistics.median(seconds),
        "best_seconds": min(seconds),
        "median_peak_extra_bytes": statistics.median(peaks),
        "median_peak_extra_mib": statistics.median(peaks) / 2**20,
        "grad_bytes": runs[0]["grad_bytes"],
        "input_bytes": runs[0]["input_bytes"],
        "loss": runs[0]["loss"],
        "runs": runs,
    }


def _triton_rows() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device on this machine: the Triton kernels only run compiled on "
            "CUDA; the CPU interpreter is ~1000x slower than torch and says nothing about speed"
        }
    return _cuda_triton_rows()


def _cuda_time(fn, inputs) -> tuple[float, int]:
    import torch

    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn(*inputs).backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base


def _cuda_triton_rows() -> dict[str, Any]:
    import torch

    from pcc_dist.kernels.infonce import infonce_triton
    from pcc_dist.kernels.pearson import pearson_triton
    from pcc_dist.losses import infonce_reference, pearson_reference

    rows: dict[str, Any] = {}
    s = SHAPES["infonce"]
    x = [torch.randn(s["anchors"], s["dim"], device="cuda", requires_grad=True) for _ in range(3)]
    pairs = {
        "infonce": (
            lambda a, p, h: infonce_triton(a, p, h, temperature=s["temperature"]),
            lambda a, p, h: infonce_reference(a, p, h, temperature=s["temperature"]),
            x,
        ),
    }
    s = SHAPES["pearson"]
    a = torch.randn(s["pairs"], s["dim"], device="cuda", requires_grad=True)
    b = torch.randn(s["pairs"], s["dim"], device="cuda", requires_grad=True)
    y = torch.rand(s["pairs"], device="cuda")
    pairs["pearson"] = (
        lambda a, b, y: pearson_triton(a, b, y).loss,
        lambda a, b, y: pearson_reference(a, b, y).loss,
        [a, b, y],
    )
    for case, (triton_fn, torch_fn, inputs) in pairs.items():
        _cuda_time(triton_fn, inputs)  # compile + warm-up
        _cuda_time(torch_fn, inputs)
        t_s, t_mem = _cuda_time(triton_fn, inputs)
        r_s, r_mem = _cuda_time(torch_fn, inputs)
        rows[case] = {
            "triton": {"seconds": t_s, "peak_extra_bytes": t_mem},
            "torch": {"seconds": r_s, "peak_extra_bytes": r_mem},
            "time_ratio_triton_over_torch": t_s / r_s,
            "memory_ratio_triton_over_torch": t_mem / max(r_mem, 1),
        }
    return rows


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--cases", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--size-divisor", type=int, default=1,
                        help="divide the rows (anchors, pairs) of the full shapes by K, for a "
                             "loaded machine (results go to losses_div<K>.json)")
    opts = parser.parse_args(argv)
    threads = opts.threads or len(os.sched_getaffinity(0))
    shapes = QUICK_SHAPES if opts.quick else SHAPES
    if opts.size_divisor > 1 and not opts.quick:
        k = opts.size_divisor
        shapes = {"infonce": dict(SHAPES["infonce"], anchors=SHAPES["infonce"]["anchors"] // k),
                  "pearson": dict(SHAPES["pearson"], pairs=SHAPES["pearson"]["pairs"] // k)}
    document: dict[str, Any] = {
        "machine": machine_facts(),
        "threads": threads,
        "repeats": opts.repeats,
        "shapes": {case: shapes[case] for case in opts.cases},
        "cases": {},
    }
    for case in opts.cases:
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rep in range(opts.repeats):
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs[variant].append(_spawn(case, variant, shapes[case], threads))
        ours, naive = _summary(runs["ours"]), _summary(runs["naive"])
        result = {
            "ours": ours,
            "naive": naive,
            "memory_ratio_ours_over_naive": ours["median_peak_extra_bytes"]
            / max(naive["median_peak_extra_bytes"], 1),
            "time_ratio_ours_over_naive": ours["median_seconds"] / naive["median_seconds"],
            "best_time_ratio_ours_over_naive": ours["best_seconds"] / naive["best_seconds"],
            "loss_relative_difference": abs(ours["loss"] - naive["loss"]) / abs(naive["loss"]),
        }
        if case in ACCEPTANCE and not opts.quick:
            limits = ACCEPTANCE[case]
            result["acceptance"] = limits | {
                "memory_ok": result["memory_ratio_ours_over_naive"] <= limits["max_memory_ratio"],
                "time_ok": result["time_ratio_ours_over_naive"] <= limits["max_time_ratio"],
            }
        document["cases"][case] = result
    document["triton"] = _triton_rows()
    name = "losses_quick" if opts.quick else (
        f"losses_div{opts.size_divisor}" if opts.size_divisor > 1 else "losses")
    return write_result(name, document)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, case_arg, variant_arg, shape_arg, threads_arg = sys.argv
        print(
            json.dumps(run_worker(case_arg, variant_arg, json.loads(shape_arg), int(threads_arg)))
        )
    else:
        print(main())
