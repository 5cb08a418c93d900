"""How memory and time scale: losses vs batch size, gradient cache vs global batch, 1 vs 2 ranks.

Four sweeps, each point in a fresh subprocess (so one point's heap cannot leak into another's
peak), fp32, this machine's CPU:

1. ``infonce``: N anchors against 2N candidates (positives + hard negatives), D = 256, our tiled
   :func:`pcc_dist.losses.infonce_reference` vs the naive materialised ``N x 2N`` logits +
   ``F.cross_entropy``, N doubling until the naive version runs out of memory. "Out of memory" is
   real: after the inputs exist, the worker caps its address space with
   ``resource.setrlimit(RLIMIT_AS, VmSize + CAP)`` (CAP = 4 GiB by default, ``--cap-gib``), so an
   allocation beyond the cap raises (torch: ``RuntimeError: ... can't allocate memory``) instead of
   swapping or disturbing the other jobs of this 24 GiB machine.
2. ``pearson``: N pairs up to 262,144, D = 256 (D = 4,096 at that N would need 16 GiB for the
   inputs and their gradients alone), :func:`pcc_dist.losses.pearson_reference` vs naive autograd.
   Same cap.
3. ``gradcache``: peak RSS of a ZeRO-3 training step vs the global batch, with gradient-cache
   chunks of 16 and without the cache, through ``gradcache_memory.py``'s measurement (the same
   tiny Llama, InfoNCE with hard negatives); the points ``gradcache_memory.json`` already holds
   (32 and 512) are merged in.
4. ``ranks``: the product's stage-2 loop (``train_throughput.run_ours``: StageRunner, DeepSpeed
   ZeRO-3, all-MiniLM-L6-v2, global batch 64, max length 64) under ``torchrun`` on 1 rank
   (2 torch threads) and 2 ranks (1 thread each: this machine has 2 cores), alternating
   (1, 2, 2, 1). Each run also counts the bytes and calls through the ``torch.distributed``
   collectives per step (``comm_bytes.CommCounter``): on one machine the ranks split the same
   2 cores, so 2 ranks can only add communication (ZeRO-3 all-gathers every parameter in
   forward and backward, reduce-scatters every gradient) on top of the same compute.

Usage:
    python benchmarks/scaling.py [--quick] [--parts infonce pearson gradcache ranks]

Writes ``benchmarks/results/scaling.json`` and ``scaling_losses.png``, ``scaling_gradcache.png``,
``scaling_ranks.png``.
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
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import RESULTS_DIR, machine_facts, write_result  # noqa: E402

INFONCE_DIM = 256
PEARSON_DIM = 256
INFONCE_N = [4096, 8192, 16384]
PEARSON_N = [16384, 65536, 262144]
GRADCACHE_BATCHES = [64]
QUICK = {"infonce": [512, 1024, 2048], "pearson": [4096, 16384], "gradcache": [64],
         "rank_steps": 3}
WORKER_TIMEOUT = 900
CAP_GIB = 4.0


# --------------------------------------------------------------------------------------------------
# Loss points (one subprocess each)
# --------------------------------------------------------------------------------------------------


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def loss_worker(case: str, variant: str, n: int, dim: int, cap_gib: float,
                threads: int) -> dict[str, Any]:
    """One forward + backward of ``case``/``variant`` at ``n`` rows under an address-space cap."""
    import losses as bench_losses
    import torch

    torch.set_num_threads(threads)
    if case == "infonce":
        shape = {"anchors": n, "dim": dim, "temperature": 0.05, "chunk_size": 2048}
        fns, make_inputs = bench_losses._infonce_fns(shape)
    else:
        shape = {"pairs": n, "dim": dim}
        fns, make_inputs = bench_losses._pearson_fns(shape)
    fn = fns[variant]
    warm = make_inputs(max(1, n // 256))
    fn(*warm).backward()
    del warm
    torch.manual_seed(0)
    inputs = make_inputs(1)
    gc.collect()
    method = bench_losses._reset_peak()
    base_kib = _vm_kib("VmRSS")
    cap = int(_vm_kib("VmSize") * 1024 + cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    start = time.perf_counter()
    try:
        loss = fn(*inputs)
        loss.backward()
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return {"case": case, "variant": variant, "n": n, "dim": dim, "oom": True,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "seconds_until_oom": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    peak = bench_losses._peak_kib(method)
    return {"case": case, "variant": variant, "n": n, "dim": dim, "oom": False,
            "seconds": seconds, "peak_extra_bytes": max(0, peak - base_kib) * 1024,
            "loss": float(loss.detach()), "memory_method": method}


def _spawn_loss(case: str, variant: str, n: int, dim: int, cap: float, threads: int):
    cmd = [sys.executable, __file__, "--loss-worker",
           json.dumps([case, variant, n, dim, cap, threads])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    if proc.returncode != 0:
        # A hard kill by the allocator (e.g. SIGSEGV/abort inside a failed allocation) counts as
        # out of memory only when the cap was hit; anything else is a failure of the benchmark.
        tail = proc.stderr[-2000:]
        if "alloc" in tail.lower() or "memory" in tail.lower():
            return {"case": case, "variant": variant, "n": n, "dim": dim, "oom": True,
                    "error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1][:200]}"}
        raise RuntimeError(f"{case}/{variant}/N={n} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_loss(case: str, sizes: list[int], dim: int, cap: float, threads: int) -> list[dict]:
    rows: list[dict] = []
    naive_alive = True
    for i, n in enumerate(sizes):
        order = ("ours", "naive") if i % 2 == 0 else ("naive", "ours")
        for variant in order:
            if variant == "naive" and not naive_alive:
                continue
            row = _spawn_loss(case, variant, n, dim, cap, threads)
            rows.append(row)
            state = "OOM" if row["oom"] else (f"{row['seconds']:.2f} s, "
                                              f"{row['peak_extra_bytes'] / 2**20:.0f} MiB")
            print(f"  {case} {variant:5s} N={n:7d}: {state}", flush=True)
            if variant == "naive" and row["oom"]:
                naive_alive = False
    return rows


# --------------------------------------------------------------------------------------------------
# Gradient cache vs global batch
# --------------------------------------------------------------------------------------------------


def sweep_gradcache(batches: list[int]) -> list[dict]:
    import gradcache_memory

    rows = []
    for batch in batches:
        for chunk in (gradcache_memory.CHUNK, 0):
            spec = {"global_batch": batch, "chunk": chunk, "threads": 1}
            result = gradcache_memory.run_child(spec, WORKER_TIMEOUT)
            result["source"] = "scaling.py"
            rows.append(result)
            print(f"  gradcache batch {batch:4d} chunk {chunk:2d}: peak "
                  f"{result['peak_rss_mib']:.0f} MiB", flush=True)
    existing = RESULTS_DIR / "gradcache_memory.json"
    if existing.exists():
        for run in json.loads(existing.read_text()).get("memory_runs", []):
            if run["global_batch"] not in batches:
                rows.append(dict(run, source="gradcache_memory.json"))
    return sorted(rows, key=lambda r: (r["chunk"], r["global_batch"]))


# --------------------------------------------------------------------------------------------------
# 1 vs 2 ranks (torchrun)
# --------------------------------------------------------------------------------------------------


def rank_worker(spec: dict[str, Any]) -> None:
    """Runs under torchrun: the product's stage-2 loop, collectives counted; rank 0 writes."""
    import torch

    torch.set_num_threads(spec["threads"])
    import train_throughput
    from comm_bytes import CommCounter

    from pcc_dist.data import load_sts7, resolve_data_root
    from pcc_dist.distributed import shutdown_distributed

    data_root = resolve_data_root(None)
    tasks = load_sts7(data_root)
    with CommCounter() as counter:
        result = train_throughput.run_ours("zero3", spec["steps"], spec["warmup"],
                                           Path(spec["workdir"]), data_root, tasks)
    totals = counter.totals.get("default", {"calls": 0, "input_bytes": 0, "output_bytes": 0,
                                            "seconds": 0.0, "ops": {}})
    total_steps = spec["steps"] + spec["warmup"]
    # Counted over the whole run (engine set-up, warm-up and the final checkpoint included), so
    # per step is an upper bound of the steady state.
    result["collectives_whole_run"] = totals
    result["collective_output_bytes_per_step_upper"] = totals["output_bytes"] / total_steps
    result["threads_per_rank"] = spec["threads"]
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(result))
    shutdown_distributed()


def run_ranks(world: int, threads: int, steps: int, warmup: int, workdir: Path) -> dict:
    out = workdir / f"ranks_{world}_{time.monotonic_ns()}.json"
    spec = {"threads": threads, "steps": steps, "warmup": warmup, "workdir": str(workdir),
            "out": str(out)}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent),
                                                        os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, "--rank-worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun W={world} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def sweep_ranks(steps: int, warmup: int) -> dict[str, Any]:
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pcc_ranks_") as tmp:
        for world in (1, 2, 2, 1):
            threads = 2 // world
            res = run_ranks(world, threads, steps, warmup, Path(tmp))
            res["load_avg_1min_after"] = os.getloadavg()[0]
            runs.append(res)
            print(f"  W={world} ({threads} thread/rank): {res['pairs_per_second']:.1f} pairs/s, "
                  f"{res['steps_per_second']:.3f} steps/s, collectives "
                  f"{res['collective_output_bytes_per_step_upper'] / 2**20:.0f} MiB/step",
                  flush=True)
    summary = {}
    for world in (1, 2):
        mine = [r for r in runs if r["world_size"] == world]
        summary[f"W{world}"] = {
            "median_pairs_per_second": statistics.median(r["pairs_per_second"] for r in mine),
            "median_steps_per_second": statistics.median(r["steps_per_second"] for r in mine),
            "collective_mib_per_step_upper": statistics.median(
                r["collective_output_bytes_per_step_upper"] for r in mine) / 2**20,
            "forward_ms": statistics.median(
                r["breakdown"]["forward_engine_incl_zero_hooks"]["ms_per_step"] for r in mine),
            "backward_ms": statistics.median(
                r["breakdown"]["backward_incl_zero_hooks"]["ms_per_step"] for r in mine),
        }
    return {"runs": runs, "summary": summary,
            "speedup_2_over_1": summary["W2"]["median_pairs_per_second"]
            / summary["W1"]["median_pairs_per_second"]}


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(doc: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for row, case in enumerate(("infonce", "pearson")):
        rows = doc.get(case, {}).get("points", [])
        for variant, style in (("ours", "o-"), ("naive", "s--")):
            pts = [r for r in rows if r["variant"] == variant and not r["oom"]]
            xs = [r["n"] for r in pts]
            axes[row][0].plot(xs, [r["peak_extra_bytes"] / 2**20 for r in pts], style,
                              label=variant)
            axes[row][1].plot(xs, [r["seconds"] for r in pts], style, label=variant)
            for r in rows:
                if r["variant"] == variant and r["oom"]:
                    for ax in axes[row]:
                        ax.axvline(r["n"], color="red", ls=":", alpha=0.7)
                    axes[row][0].annotate(f"naive OOM\n(cap {doc.get('cap_gib')} GiB)",
                                          xy=(r["n"], 0.5), xycoords=("data", "axes fraction"),
                                          ha="right", color="red", fontsize=8)
        dim = doc.get(case, {}).get("dim")
        axes[row][0].set_title(f"{case}: peak extra memory (D = {dim})")
        axes[row][1].set_title(f"{case}: forward + backward time (D = {dim})")
        axes[row][0].set_ylabel("MiB")
        axes[row][1].set_ylabel("seconds")
        for ax in axes[row]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (InfoNCE: anchors, 2N candidates)" if case == "infonce"
                          else "N pairs")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradcache(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for chunk, style, label in ((16, "o-", "gradient cache, chunk 16"), (0, "s--", "no cache")):
        pts = sorted((r for r in rows if r["chunk"] == chunk), key=lambda r: r["global_batch"])
        ax.plot([r["global_batch"] for r in pts], [r["peak_rss_mib"] for r in pts], style,
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch (3 views each)")
    ax.set_ylabel("peak RSS of a step (MiB)")
    ax.set_title("ZeRO-3 step memory vs global batch (tiny Llama)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranks(ranks: dict[str, Any], path: Path) -> None:
    plt = _plt()
    s = ranks["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = ["W=1 (2 threads)", "W=2 (1 thread each)"]
    ax1.bar(labels, [s["W1"]["median_pairs_per_second"], s["W2"]["median_pairs_per_second"]],
            color=["tab:blue", "tab:orange"])
    ax1.set_ylabel("pairs/s (global batch 64)")
    ax1.set_title("MiniLM stage 2, ZeRO-3 on 2 CPU cores")
    ax2.bar(labels, [s["W1"]["collective_mib_per_step_upper"],
                     s["W2"]["collective_mib_per_step_upper"]], color=["tab:blue", "tab:orange"])
    ax2.set_ylabel("MiB through collectives per step (rank 0)")
    ax2.set_title("communication per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--parts", nargs="+", default=["infonce", "pearson", "gradcache", "ranks"],
                        choices=["infonce", "pearson", "gradcache", "ranks"])
    parser.add_argument("--cap-gib", type=float, default=CAP_GIB)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rank-steps", type=int, default=8)
    parser.add_argument("--out", default="scaling")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    doc: dict[str, Any] = {
        "benchmark": "scaling",
        "machine": machine_facts(),
        "threads": threads,
        "cap_gib": args.cap_gib,
        "oom_method": f"resource.setrlimit(RLIMIT_AS) = VmSize after the inputs exist + "
                      f"{args.cap_gib} GiB, per point in its own process; a failed allocation "
                      f"(MemoryError / torch 'can't allocate memory') is recorded as OOM",
        "quick": args.quick,
    }
    plots: dict[str, Path] = {}
    errors: dict[str, str] = {}

    def part(name: str, fn) -> None:
        """Run one sweep; a failure is recorded and the other sweeps still run."""
        if name not in args.parts:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep the other parts' results
            import traceback

            errors[name] = traceback.format_exc()[-3000:]
            print(f"  {name} FAILED: {type(exc).__name__}: {str(exc)[-500:]}", flush=True)

    def losses_part(case: str, sizes: list[int], dim: int) -> None:
        points = sweep_loss(case, sizes, dim, args.cap_gib, threads)
        entry: dict[str, Any] = {"dim": dim, "points": points}
        if case == "infonce":
            entry["candidates"] = "2N"
            entry["naive_oom_at"] = min((p["n"] for p in points
                                         if p["variant"] == "naive" and p["oom"]), default=None)
        ratios = []
        for n in sorted({p["n"] for p in points}):
            o = next((p for p in points if p["n"] == n and p["variant"] == "ours"), None)
            v = next((p for p in points if p["n"] == n and p["variant"] == "naive"), None)
            if o and v and not o["oom"] and not v["oom"]:
                ratios.append({"n": n, "memory_ratio": o["peak_extra_bytes"]
                               / max(v["peak_extra_bytes"], 1),
                               "time_ratio": o["seconds"] / v["seconds"]})
        entry["ratios_ours_over_naive"] = ratios
        doc[case] = entry

    part("infonce", lambda: losses_part("infonce", QUICK["infonce"] if args.quick
                                        else INFONCE_N, INFONCE_DIM))
    part("pearson", lambda: losses_part("pearson", QUICK["pearson"] if args.quick
                                        else PEARSON_N, PEARSON_DIM))
    if "infonce" in doc or "pearson" in doc:
        plots["losses"] = RESULTS_DIR / f"{args.out}_losses.png"
        plot_losses(doc, plots["losses"])

    def gradcache_part() -> None:
        rows = sweep_gradcache(QUICK["gradcache"] if args.quick else GRADCACHE_BATCHES)
        doc["gradcache"] = {"points": rows, "setup": "gradcache_memory.py child(): tiny Llama, "
                                                      "InfoNCE with hard negatives, ZeRO-3, 1 rank"}
        plots["gradcache"] = RESULTS_DIR / f"{args.out}_gradcache.png"
        plot_gradcache(rows, plots["gradcache"])

    def ranks_part() -> None:
        steps = QUICK["rank_steps"] if args.quick else args.rank_steps
        doc["ranks"] = sweep_ranks(steps, 1)
        doc["ranks"]["note"] = (
            "both ranks run on the same 2 cores: W=2 halves each rank's threads, so at best "
            "it matches W=1; what it adds is ZeRO-3 parameter all-gathers (forward and "
            "backward) and gradient reduce-scatters over gloo, counted in "
            "collective_mib_per_step_upper")
        plots["ranks"] = RESULTS_DIR / f"{args.out}_ranks.png"
        plot_ranks(doc["ranks"], plots["ranks"])

    part("gradcache", gradcache_part)
    part("ranks", ranks_part)
    doc["errors"] = errors
    doc["plots"] = {k: str(v.relative_to(RESULTS_DIR.parent.parent)) for k, v in plots.items()}
    path = write_result(args.out, doc)
    print(f"wrote {path}" + (f"; FAILED parts: {', '.join(errors)}" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loss-worker":
        print(json.dumps(loss_worker(*json.loads(sys.argv[2]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
