"""benchmarks/run_all.py: ratio extraction, aggregation and the summary table (no script runs)."""

from __future__ import annotations

import time

import pytest
from helpers import load_benchmark

run_all = load_benchmark("run_all")


def _eval_doc():
    return {"ratio_ours_over_theirs_best": 1.42, "ratio_ours_over_theirs_mean": 1.40,
            "ratio_ours_over_theirs_cpu_time": 1.41, "repeats": 2, "n_sentences": 100}


def _throughput_doc():
    return {"summary": {"stage2:ours_auto": {"median_pairs_per_second": 30.0},
                        "stage2:st_cosent": {"median_pairs_per_second": 40.0}},
            "ratios": {"stage2:ours_auto / stage2:st_cosent": {"median": 0.75, "best": 0.8}}}


def test_every_script_has_an_extractor():
    assert {s.name for s in run_all.SCRIPTS} == set(run_all.EXTRACTORS)


def test_eval_speed_and_throughput_rows():
    rows = run_all.extract_rows("eval_speed", _eval_doc())
    assert [r["value"] for r in rows] == [1.42]
    rows = run_all.extract_rows("train_throughput", _throughput_doc())
    assert rows[0]["value"] == 0.75
    assert "30.0 vs 40.0" in rows[0]["detail"]


def test_losses_rows_and_triton_skip_reason():
    doc = {"shapes": {"pearson": {"pairs": 8, "dim": 4}},
           "cases": {"pearson": {"memory_ratio_ours_over_naive": 0.35,
                                 "time_ratio_ours_over_naive": 0.07}},
           "triton": {"skipped": "no CUDA device"}}
    rows = run_all.extract_rows("losses", doc)
    values = {r["metric"]: r["value"] for r in rows}
    assert values["pearson peak extra memory, ours / naive"] == 0.35
    assert values["pearson time, ours / naive"] == 0.07
    assert any("no CUDA device" in r["detail"] for r in rows)


def test_comm_bytes_and_scaling_rows():
    rows = run_all.extract_rows("comm_bytes", {"dim": 4096, "world_size": 2, "table": [
        {"batch_per_rank": 64, "ours_bytes": 48, "all_gather_bytes": 4800,
         "all_gather_over_ours": 100.0}]})
    assert rows[0]["value"] == 100.0
    scaling = {"cap_gib": 4.0,
               "infonce": {"dim": 256, "naive_oom_at": 16384,
                           "points": [{"variant": "ours", "n": 16384, "oom": False}],
                           "ratios_ours_over_naive": [{"n": 8192, "memory_ratio": 0.1,
                                                       "time_ratio": 1.1}]},
               "gradcache": {"points": [{"chunk": 16, "global_batch": 32, "peak_rss_mib": 100},
                                        {"chunk": 16, "global_batch": 512,
                                         "peak_rss_mib": 110}]},
               "ranks": {"speedup_2_over_1": 0.5, "summary": {
                   "W1": {"median_pairs_per_second": 20.0},
                   "W2": {"median_pairs_per_second": 10.0,
                          "collective_mib_per_step_upper": 300.0}}}}
    values = {r["metric"]: r["value"] for r in run_all.extract_rows("scaling", scaling)}
    assert values["InfoNCE naive out of memory at N"] == 16384
    assert values["gradcache peak RSS largest / smallest batch, with cache"] == pytest.approx(1.1)
    assert values["ZeRO-3 2 ranks / 1 rank pairs/s (2 cores)"] == 0.5


def test_a_schema_change_gives_a_row_not_a_crash():
    rows = run_all.extract_rows("eval_speed", {"ratio_ours_over_theirs_mean": "oops"})
    assert rows[0]["metric"] == "extraction failed"


def test_aggregate_marks_failures_and_the_table_shows_them():
    statuses = {"eval_speed": {"status": "ok", "seconds": 10.0},
                "losses": {"status": "failed", "seconds": 2.0, "reason": "exit code 1",
                           "stderr_tail": "Traceback ..."},
                "peer_quality": {"status": "skipped", "reason": "--skip"}}
    bench = run_all.aggregate(statuses, {"eval_speed": _eval_doc()})
    assert bench["failed"] == ["losses"] and bench["ok"] is False
    assert len(bench["ratios"]) == 1
    table = run_all.summary_table(bench["ratios"], statuses)
    assert "1.420" in table and "failed" in table and "skipped" in table
    assert run_all.aggregate({"a": {"status": "skipped"}}, {})["ok"] is True


def test_a_result_without_the_expected_fields_fails_the_run():
    statuses = {"eval_speed": {"status": "ok", "seconds": 1.0}}
    bench = run_all.aggregate(statuses, {"eval_speed": {"unexpected": 1}})
    assert bench["failed"] == ["eval_speed"] and bench["ok"] is False
    assert "expected fields" in statuses["eval_speed"]["reason"]


def test_a_timed_out_script_is_killed_with_its_children(tmp_path, monkeypatch):
    """The script starts a child that would outlive it; the timeout kills the whole group."""
    pid_file = tmp_path / "child.pid"
    (tmp_path / "sleeper.py").write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    status = run_all.run_script(run_all.Script("sleeper", args=(), timeout=3.0), quick=False,
                                log_dir=tmp_path)
    assert status["status"] == "timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the script's child survived the timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"  # a zombie is dead, just not reaped
    except FileNotFoundError:
        return False


def test_unknown_script_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "eval_sped"])
    assert "unknown script(s) ['eval_sped']" in capsys.readouterr().err


def test_plot_files_follow_the_result_stem():
    scaling = next(s for s in run_all.SCRIPTS if s.name == "scaling")
    assert [p.name for p in scaling.plot_files(quick=True)] == [
        "scaling_quick_losses.png", "scaling_quick_gradcache.png", "scaling_quick_ranks.png"]
    peer = next(s for s in run_all.SCRIPTS if s.name == "peer_quality")
    assert [p.name for p in peer.plot_files(quick=False)] == ["peer_quality_bench.png"]


def test_peer_quality_acceptance_block_is_preferred():
    doc = {"smoke_test": False,
           "methods": {"pcc": {"label": "Pcc-tuning (ours)", "lr": 2e-5, "sts7": {"avg": 79.6}},
                       "cosent": {"label": "ST CoSENTLoss", "lr": 2e-5, "sts7": {"avg": 79.1}}},
           "acceptance": {"ours_avg": 79.6, "best_peer": "cosent", "best_peer_avg": 79.1,
                          "margin": 0.5}}
    values = {r["metric"]: r["value"] for r in run_all.extract_rows("peer_quality", doc)}
    assert values["STS7 avg, Pcc-tuning (ours)"] == 79.6
    assert values["STS7 avg difference, ours - best peer (cosent)"] == 0.5
