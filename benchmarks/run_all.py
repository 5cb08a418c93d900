"""``make bench``: run every benchmark script, collect every ratio into one JSON, print a table.

Each script runs as a subprocess with sizes chosen so that the whole run fits in an hour on the
2-core CPU machine (``--quick`` instead runs smoke sizes in a few minutes); its progress line
shows the elapsed time. A script that fails or times out does not stop the others: its exit code
and the tail of its stderr go into ``bench.json``, and ``run_all`` exits non-zero at the end.

Everything a script wrote is read back from its own JSON in ``benchmarks/results/``; ratios are
extracted by the small functions in :data:`EXTRACTORS` (one per script) into rows
``{"benchmark", "metric", "value", "detail"}``, and :func:`summary_table` formats them.

Usage:
    python benchmarks/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]

Writes ``benchmarks/results/bench.json`` (and the scripts' own JSON and PNG files).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import RESULTS_DIR, machine_facts, write_result  # noqa: E402


@dataclass(frozen=True)
class Script:
    """One benchmark script: its file, arguments (full and quick), results stem, time limit and
    plot suffixes."""

    name: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ("--quick",)
    result: str = ""
    quick_result: str = ""
    timeout: float = 1200.0
    plots: tuple[str, ...] = field(default_factory=tuple)

    def result_stem(self, quick: bool) -> str:
        base = self.result or self.name
        return (self.quick_result or base) if quick else base

    def plot_files(self, quick: bool) -> list[Path]:
        """The PNGs the script writes: ``<result stem><suffix>.png`` for each of ``plots``."""
        return [RESULTS_DIR / f"{self.result_stem(quick)}{suffix}.png" for suffix in self.plots]


# Sizes chosen so that the whole run fits in an hour on the 2-core machine while other jobs share
# it (measured 2026-11-25 at a load average of 8-13, i.e. ~4x slower than a quiet machine).
# The full-size runs behind the README's "Benchmarks" rows are the scripts' own defaults:
# eval_speed times 1,500 of the 26,289 sentences here, losses uses 1/4 of the full rows,
# gradcache_memory compares global batches 32 and 128 (the 512 point is in scaling.json),
# train_throughput runs 4 timed steps per run.
SCRIPTS: tuple[Script, ...] = (
    Script("eval_speed", args=("--repeats", "2", "--limit-sentences", "1500", "--out",
                               "eval_speed_bench"), result="eval_speed_bench",
           quick_args=("--repeats", "2", "--limit-sentences", "300", "--out",
                       "eval_speed_quick"),
           quick_result="eval_speed_quick", timeout=1500),
    Script("losses", args=("--repeats", "2", "--size-divisor", "4"), result="losses_div4",
           quick_args=("--quick", "--repeats", "2"), quick_result="losses_quick", timeout=1500),
    Script("gradcache_memory", args=("--quick",), result="gradcache_memory_quick",
           quick_result="gradcache_memory_quick", timeout=1200),
    Script("train_throughput", args=("--steps", "4", "--warmup", "1", "--repeats", "2"),
           quick_args=("--quick",),
           quick_result="train_throughput_quick", timeout=1800,
           plots=("",)),
    Script("comm_bytes", args=(), quick_args=("--batches", "64", "256", "--dim", "1024",
                                              "--out", "comm_bytes_quick"),
           quick_result="comm_bytes_quick", timeout=900, plots=("",)),
    Script("scaling", args=("--rank-steps", "3"), quick_args=("--quick", "--out", "scaling_quick"),
           quick_result="scaling_quick", timeout=2100,
           plots=("_losses", "_gradcache", "_ranks")),
    # Compiles every kernel launch for sm_80/sm_90 (no GPU): about a minute on a fresh cache.
    Script("kernel_resources", args=(), quick_args=("--quick",), timeout=900),
    # One shared lr (the demo's 5e-5) instead of the script's 3-point grid: four MiniLM trainings
    # and four STS7 evaluations, ~20 min on a quiet machine. The README's table is the grid run
    # (`python benchmarks/peer_quality.py`, 12 trainings, peer_quality.json).
    Script("peer_quality", args=("--lrs", "5e-5", "--out", "peer_quality_bench"),
           result="peer_quality_bench",
           quick_args=("--lrs", "5e-5", "--max-steps", "2", "--eval-limit", "20", "--out",
                       "peer_quality_quick"),
           quick_result="peer_quality_quick", timeout=2400,
           plots=("",)),
    # Tokenisation only (one epoch of the demo's stage-2 steps), ~15 s.
    Script("padding", args=(), quick_args=("--steps", "8", "--out", "padding_quick"),
           quick_result="padding_quick", timeout=600),
)


# --------------------------------------------------------------------------------------------------
# Ratio extraction (pure functions of a script's JSON; unit-tested)
# --------------------------------------------------------------------------------------------------

Row = dict[str, Any]


def _row(benchmark: str, metric: str, value: Any, detail: str = "") -> Row:
    return {"benchmark": benchmark, "metric": metric, "value": value, "detail": detail}


def _eval_speed(doc: dict) -> list[Row]:
    return [_row("eval_speed", "STS7 embedding throughput, ours / sentence-transformers",
                 doc.get("ratio_ours_over_theirs_best"),
                 f"best of {doc.get('repeats')}; mean {doc.get('ratio_ours_over_theirs_mean'):.3f}"
                 f", CPU time {doc.get('ratio_ours_over_theirs_cpu_time'):.3f}; "
                 f"{doc.get('n_sentences')} sentences")]


def _losses(doc: dict) -> list[Row]:
    rows = []
    shapes = doc.get("shapes", {})
    for case, res in doc.get("cases", {}).items():
        shape = shapes.get(case, {})
        size = (f"{shape.get('anchors')} anchors, D={shape.get('dim')}" if case == "infonce"
                else f"N={shape.get('pairs')}, D={shape.get('dim')}")
        rows.append(_row("losses", f"{case} peak extra memory, ours / naive",
                         res.get("memory_ratio_ours_over_naive"), size))
        rows.append(_row("losses", f"{case} time, ours / naive",
                         res.get("time_ratio_ours_over_naive"), f"median; {size}"))
    triton = doc.get("triton", {})
    if "skipped" in triton:
        rows.append(_row("losses", "Triton vs torch (GPU)", None, f"skipped: {triton['skipped']}"))
    else:
        for case, res in triton.items():
            rows.append(_row("losses", f"{case} time, Triton / torch (GPU)",
                             res.get("time_ratio_triton_over_torch")))
    return rows


def _gradcache(doc: dict) -> list[Row]:
    rows = []
    for key, value in doc.get("memory", {}).items():
        if key.startswith(("peak_ratio", "step_increase_ratio")):
            rows.append(_row("gradcache_memory", key.replace("_", " "), value,
                             "peak RSS of a ZeRO-3 step"))
    for key, value in doc.get("time", {}).items():
        rows.append(_row("gradcache_memory", f"step time {key.replace('_', ' ')}", value))
    return rows


def _train_throughput(doc: dict) -> list[Row]:
    rows = []
    summary = doc.get("summary", {})
    for key, ratio in doc.get("ratios", {}).items():
        # "<stage>:ours_<variant> / <stage>:st_<loss>" (train_throughput.summarise)
        side, _, other = key.partition(" / ")
        ours = summary.get(side, {}).get("median_pairs_per_second", 0.0)
        theirs = summary.get(other, {}).get("median_pairs_per_second", 0.0)
        rows.append(_row("train_throughput",
                         f"training examples/s, {side} / {other}",
                         ratio.get("median"),
                         f"median runs; {ours:.1f} vs {theirs:.1f} pairs/s; by process CPU "
                         f"time {ratio.get('cpu_time', float('nan')):.3f}"))
    return rows


def _comm_bytes(doc: dict) -> list[Row]:
    rows = []
    for entry in doc.get("table", []):
        rows.append(_row("comm_bytes", f"collective bytes, all-gather / ours, "
                         f"B={entry['batch_per_rank']}/rank",
                         entry.get("all_gather_over_ours"),
                         f"D={doc.get('dim')}, W={doc.get('world_size')}; ours "
                         f"{entry['ours_bytes']} B vs {entry['all_gather_bytes']} B"))
    return rows


def _scaling(doc: dict) -> list[Row]:
    rows = []
    for case in ("infonce", "pearson"):
        part = doc.get(case)
        if not part:
            continue
        ratios = part.get("ratios_ours_over_naive", [])
        if ratios:
            last = ratios[-1]
            rows.append(_row("scaling", f"{case} memory ours / naive at largest common N",
                             last["memory_ratio"], f"N={last['n']}, D={part.get('dim')}"))
            rows.append(_row("scaling", f"{case} time ours / naive at largest common N",
                             last["time_ratio"], f"N={last['n']}, D={part.get('dim')}"))
        if case == "infonce":
            largest_ours = max((p["n"] for p in part.get("points", [])
                                if p["variant"] == "ours" and not p["oom"]), default=None)
            rows.append(_row("scaling", "InfoNCE naive out of memory at N",
                             part.get("naive_oom_at"),
                             f"cap {doc.get('cap_gib')} GiB address space; ours ran up to "
                             f"N={largest_ours}"))
    gc_points = doc.get("gradcache", {}).get("points", [])
    for chunk, label in ((16, "with cache"), (0, "without cache")):
        pts = sorted((p for p in gc_points if p["chunk"] == chunk),
                     key=lambda p: p["global_batch"])
        if len(pts) >= 2:
            rows.append(_row("scaling", f"gradcache peak RSS largest / smallest batch, {label}",
                             pts[-1]["peak_rss_mib"] / pts[0]["peak_rss_mib"],
                             f"batch {pts[-1]['global_batch']} vs {pts[0]['global_batch']}"))
    ranks = doc.get("ranks")
    if ranks:
        s = ranks["summary"]
        rows.append(_row("scaling", "ZeRO-3 2 ranks / 1 rank pairs/s (2 cores)",
                         ranks.get("speedup_2_over_1"),
                         f"W1 {s['W1']['median_pairs_per_second']:.1f}, W2 "
                         f"{s['W2']['median_pairs_per_second']:.1f} pairs/s; collectives "
                         f"{s['W2']['collective_mib_per_step_upper']:.0f} MiB/step at W2"))
    return rows


def _peer_quality(doc: dict) -> list[Row]:
    """Per-method STS7 averages and the acceptance margin (ours minus the best peer)."""
    smoke = " (SMOKE TEST sizes)" if doc.get("smoke_test") else ""
    rows = [_row("peer_quality", f"STS7 avg, {method['label']}", method["sts7"]["avg"],
                 f"lr {method['lr']:g}{smoke}") for method in doc["methods"].values()]
    acc = doc["acceptance"]
    rows.append(_row("peer_quality", f"STS7 avg difference, ours - best peer "
                     f"({acc['best_peer']})", acc["margin"],
                     f"ours {acc['ours_avg']:.2f} vs {acc['best_peer_avg']:.2f}{smoke}"))
    return rows


def _kernel_resources(doc: dict) -> list[Row]:
    rows = [_row("kernel_resources", "compiled launches with spills or over shared memory",
                 sum(bool(r["problems"]) for r in doc["rows"]),
                 f"{len(doc['rows'])} launches, sm_80 + sm_90, no GPU; "
                 f"failures: {len(doc['failures'])}")]
    for name, entry in doc.get("roofline_h100_computed", {}).items():
        rows.append(_row("kernel_resources", f"InfoNCE {name}: computed H100 roofline, "
                         "torch / Triton time", entry["predicted_speedup"],
                         f"computed, not measured: {entry['triton_us']} vs {entry['torch_us']} µs"))
    return rows


def _padding(doc: dict) -> list[Row]:
    return [_row("padding", f"processed tokens per stage-2 step, whole views / {way}",
                 res.get("fewer_than_whole_view"),
                 f"{res.get('processed_tokens_per_step', 0):.0f} processed, "
                 f"{res.get('real_token_fraction', 0):.1%} real; batch "
                 f"{doc.get('global_batch_size')}, {doc.get('steps')} steps")
            for way, res in doc.get("ways", {}).items() if way != "whole_view"]


EXTRACTORS: dict[str, Callable[[dict], list[Row]]] = {
    "eval_speed": _eval_speed,
    "losses": _losses,
    "gradcache_memory": _gradcache,
    "train_throughput": _train_throughput,
    "comm_bytes": _comm_bytes,
    "scaling": _scaling,
    "peer_quality": _peer_quality,
    "kernel_resources": _kernel_resources,
    "padding": _padding,
}


def extract_rows(name: str, doc: dict) -> list[Row]:
    """Ratio rows of one script's JSON; an extractor that trips over the schema gives one row
    that says so instead of failing the whole summary."""
    try:
        return EXTRACTORS[name](doc)
    except Exception as exc:  # noqa: BLE001 - a summary must survive a schema change
        return [_row(name, "extraction failed", None, f"{type(exc).__name__}: {exc}")]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}"
    return str(value)


def summary_table(rows: list[Row], statuses: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one line per ratio, then one line per script status."""
    width = max([len(r["metric"]) for r in rows] + [20])
    lines = [f"{'benchmark':18s} {'metric':{width}s} {'value':>10s}  detail",
             "-" * (width + 50)]
    for r in rows:
        lines.append(f"{r['benchmark']:18s} {r['metric']:{width}s} {_fmt(r['value']):>10s}  "
                     f"{r['detail']}")
    lines.append("")
    for name, st in statuses.items():
        secs = st.get("seconds")
        took = f"{secs:7.1f} s" if secs is not None else "       -"
        lines.append(f"{name:18s} {st['status']:8s} {took}  {st.get('reason', '')}")
    return "\n".join(lines)


def aggregate(statuses: dict[str, dict[str, Any]], documents: dict[str, dict]) -> dict[str, Any]:
    """bench.json content from per-script statuses and their loaded JSON documents."""
    rows: list[Row] = []
    for name, doc in documents.items():
        extracted = extract_rows(name, doc)
        if any(r["metric"] == "extraction failed" for r in extracted):
            statuses[name] = {**statuses[name], "status": "failed",
                              "reason": f"its JSON does not have the expected fields: "
                                        f"{extracted[0]['detail']}"}
        rows.extend(extracted)
    failed = [n for n, st in statuses.items() if st["status"] in ("failed", "timeout")]
    # GPU-only rows (Triton vs torch, model FLOP utilisation): what each script measured, or why
    # it skipped them.
    gpu = {"losses_triton": documents.get("losses", {}).get("triton"),
           "train_throughput_mfu": documents.get("train_throughput", {}).get("mfu")}
    return {"ratios": rows, "gpu": {k: v for k, v in gpu.items() if v is not None},
            "scripts": statuses, "failed": failed, "ok": not failed}


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_script(script: Script, quick: bool, log_dir: Path) -> dict[str, Any]:
    """Run one script to completion (or its timeout) with its output in ``log_dir``."""
    path = HERE / f"{script.name}.py"
    cmd = [sys.executable, str(path), *(script.quick_args if quick else script.args)]
    log = log_dir / f"{script.name}.log"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    status: dict[str, Any] = {"command": " ".join(cmd[1:]), "log": str(log)}
    with open(log, "w", encoding="utf-8") as handle:
        # Its own process group: on a timeout the script's children (torchrun ranks, pcc-train
        # runs) are killed with it instead of holding the cores for the next script.
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                cwd=HERE.parent, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=script.timeout)
            status["status"] = "ok" if code == 0 else "failed"
            status["exit_code"] = code
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status["status"] = "timeout"
            status["reason"] = f"killed after {script.timeout:.0f} s"
    status["seconds"] = time.perf_counter() - started
    if status["status"] != "ok":
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        status["stderr_tail"] = text[-3000:]
        status.setdefault("reason", f"exit code {status.get('exit_code')}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes (a few minutes)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these scripts")
    parser.add_argument("--skip", nargs="+", default=[], help="do not run these scripts "
                        "(their existing JSON is still summarised)")
    parser.add_argument("--out", default=None, help="results stem (default bench / "
                        "bench_quick)")
    args = parser.parse_args(argv)
    known = {s.name for s in SCRIPTS}
    unknown = sorted((set(args.only or []) | set(args.skip)) - known)
    if unknown:
        parser.error(f"unknown script(s) {unknown}; choose from {sorted(known)}")
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    statuses: dict[str, dict[str, Any]] = {}
    documents: dict[str, dict] = {}
    selected = [s for s in SCRIPTS if (args.only is None or s.name in args.only)]
    for i, script in enumerate(selected, 1):
        elapsed = time.perf_counter() - started
        if script.name in args.skip:
            statuses[script.name] = {"status": "skipped", "reason": "--skip"}
        else:
            print(f"[{i}/{len(selected)}] {script.name} ... (elapsed {elapsed / 60:.1f} min)",
                  flush=True)
            statuses[script.name] = run_script(script, args.quick, log_dir)
            st = statuses[script.name]
            print(f"[{i}/{len(selected)}] {script.name}: {st['status']} "
                  f"in {st.get('seconds', 0.0):.0f} s {st.get('reason', '')}", flush=True)
            if st["status"] in ("failed", "timeout"):
                print("    " + "\n    ".join(st.get("stderr_tail", "").splitlines()[-8:]),
                      flush=True)
        st = statuses[script.name]
        result = RESULTS_DIR / f"{script.result_stem(args.quick)}.json"
        if st["status"] == "ok" and not result.exists():
            st.update(status="failed", reason=f"exited 0 but wrote no {result.name}")
        if st["status"] in ("ok", "skipped") and result.exists():
            documents[script.name] = json.loads(result.read_text(encoding="utf-8"))
            st["result"] = str(result.relative_to(HERE.parent))
    bench = aggregate(statuses, documents)
    plots = [png for script in selected if script.name in documents
             for png in script.plot_files(args.quick)]
    bench = {"benchmark": "bench", "machine": machine_facts(), "quick": args.quick,
             "total_seconds": time.perf_counter() - started,
             "plots": [str(p.relative_to(HERE.parent)) for p in plots if p.exists()], **bench}
    path = write_result(args.out or ("bench_quick" if args.quick else "bench"), bench)
    print()
    print(summary_table(bench["ratios"], statuses))
    print(f"\ntotal {bench['total_seconds'] / 60:.1f} min; wrote {path}")
    return 0 if bench["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
