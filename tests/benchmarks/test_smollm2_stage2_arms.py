"""``benchmarks/smollm2_stage2_arms.py``: the plan, the lr choice by STS-B dev, the results JSON,
skipping finished runs and continuing interrupted ones.

The default-run tests replace ``pcc-train`` / ``pcc-eval`` by a fake that writes the files a
finished job leaves behind (``results.json`` with the dev score, ``sts7.json``), with dev and
test scores that disagree, so they check the driver's bookkeeping and choices, not training.
The ``slow`` test runs the real commands on a tiny Llama, one step per run.
"""

import importlib
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]

# (arm, lr) -> (STS-B dev, STS7 avg): the best dev is never the best STS7, so a choice made on
# the test sets would pick another lr. cosine MSE's best grid lr is its highest and CoSENT's its
# lowest, so each runs one lr past that edge (2e-3, 1e-4), which scores lower.
SCORES = {
    ("pearson", 2e-4): (70.0, 90.0), ("pearson", 5e-4): (80.0, 60.0),
    ("pearson", 1e-3): (75.0, 65.0), ("pearson", 2e-3): (72.0, 70.0),
    ("pearson", 4e-3): (71.0, 69.0),
    ("cosine_mse", 2e-4): (60.0, 95.0), ("cosine_mse", 5e-4): (65.0, 50.0),
    ("cosine_mse", 1e-3): (66.0, 51.0), ("cosine_mse", 2e-3): (63.0, 52.0),
    ("cosent", 1e-4): (74.0, 41.0), ("cosent", 2e-4): (79.0, 40.0), ("cosent", 5e-4): (78.0, 99.0),
    ("cosent", 1e-3): (77.0, 98.0),
    ("stage1_continued", 1e-4): (50.0, 80.0), ("stage1_continued", 2e-4): (55.0, 70.0),
    ("stage1_continued", 5e-4): (54.0, 88.0),
}


def _arg(command, prefix):
    return next(a.removeprefix(prefix) for a in command if a.startswith(prefix))


@pytest.fixture
def arms(tmp_path, monkeypatch):
    module = importlib.reload(load_benchmark("smollm2_stage2_arms"))
    module.jobs = []
    module.fail = set()
    module.threads = []
    module.barrier = None
    module.barrier_lock, module.barrier_uses = threading.Lock(), 0
    module.checkpoint_before_failing = True
    module.slow = set()  # run folders ("arm/lr..._seed..") whose job takes 1 s
    module.spans = {}  # run folder (and "eval/" + it) -> (start, end) perf_counter times
    module.stage1_dev = 40.0

    def fake_run(command, log, threads=None):
        module.jobs.append(command)
        module.threads.append(threads)
        start = time.perf_counter()
        try:
            return _fake_job(command)
        finally:
            module.spans[_span_key(command)] = (start, time.perf_counter())

    def _fake_job(command):
        if command[0].endswith("pcc-train"):
            run = Path(_arg(command, "run.output_dir="))
            run.mkdir(parents=True, exist_ok=True)
            failing = bool({run.name, f"{run.parent.name}/{run.name}"} & module.fail)
            if f"{run.parent.name}/{run.name}" in module.slow:
                time.sleep(1.0)
            if run.name == "lr0.0005_seed43" and _first_two(module):
                module.barrier.wait(timeout=30)  # the lanes' first two runs overlap in time
                if not failing:
                    time.sleep(0.5)  # and the one beside a failure ends after it
            if failing:
                if module.checkpoint_before_failing:
                    marker = run / "stage2" / "checkpoints" / "step-00000010" / "COMPLETE"
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                return 1
            arm = "stage1" if run.name == "stage1" else run.parent.name
            seed = int(_arg(command, "run.seed=")) if arm != "stage1" else 42
            lr = float(_arg(command, "stage1.lr=" if arm == "stage1_continued" else
                            "stage2.lr=")) if arm != "stage1" else None
            dev = SCORES[(arm, lr)][0] + (seed - 43) if lr else module.stage1_dev
            stage = "stage1" if arm in ("stage1", "stage1_continued") else "stage2"
            (run / "results.json").write_text(json.dumps({"stages": {stage: {
                "steps": 83, "train_seconds": 10.0, "final_loss": 0.5,
                "stsb_dev_spearman": dev}}}))
        else:
            out = Path(command[command.index("--json") + 1])
            run = out.parent
            arm = run.parent.name
            lr = float(run.name.split("_seed")[0].removeprefix("lr")) if run.name != "stage1" \
                else None
            seed = int(run.name.split("_seed")[1]) if lr else 42
            avg = SCORES[(arm, lr)][1] + (seed - 43) * 2 if lr else 30.0
            out.write_text(json.dumps({"spearman": {"STSBenchmark": avg}, "avg": avg}))
        return 0

    monkeypatch.setattr(module, "launch", fake_run)
    module.root = tmp_path / "arms"
    module.results = tmp_path / "results"
    return module


def _first_two(module):
    """True for the first two callers while ``module.barrier`` is set (later runs at the same
    lr go on: a third would wait for a partner that may come only after the timeout)."""
    with module.barrier_lock:
        module.barrier_uses += 1
        return module.barrier is not None and module.barrier_uses <= 2


def _span_key(command):
    if command[0].endswith("pcc-train"):
        run = Path(_arg(command, "run.output_dir="))
        return f"{run.parent.name}/{run.name}"
    run = Path(command[command.index("--model") + 1])
    return f"eval/{run.parent.name}/{run.name}"


def _main(arms, *extra):
    return arms.main(["--root", str(arms.root), "--results-dir", str(arms.results), *extra])


def _doc(arms):
    return json.loads((arms.results / "smollm2_stage2_arms.json").read_text())


def test_lr_is_chosen_by_dev_and_the_two_best_arms_get_a_second_seed(arms):
    assert _main(arms) == 0
    doc = _doc(arms)
    chosen = {arm: entry["chosen_lr"] for arm, entry in doc["arms"].items()}
    # By STS-B dev; the STS7 table would have chosen 2e-4, 2e-4, 5e-4, 1e-4.
    assert chosen == {"pearson": 5e-4, "cosine_mse": 1e-3, "cosent": 2e-4,
                      "stage1_continued": 2e-4}
    assert doc["second_seed_arms"] == ["pearson", "cosent"]  # dev 80 and 79 at the chosen lr
    assert doc["arms"]["pearson"]["dev_by_lr"] == {"0.0002": 70.0, "0.0005": 80.0, "0.001": 75.0}
    assert doc["arms"]["cosine_mse"]["dev_by_lr"] == {"0.0002": 60.0, "0.0005": 65.0,
                                                      "0.001": 66.0, "0.002": 63.0}
    assert list(doc["arms"]["cosent"]["dev_by_lr"]) == ["0.0001", "0.0002", "0.0005", "0.001"]
    # 24 jobs: stage 1 + its STS7, 12 grid runs + 2 past an edge, 4 STS7, 2 x (second seed +
    # its STS7).
    assert len(arms.jobs) == 24
    assert len(doc["runs"]) == 1 + 14 + 2 and len(doc["sts7"]) == 1 + 4 + 2
    assert {(e["run"], e["avg"]) for e in doc["arms"]["pearson"]["sts7"]} == {
        ("pearson/lr0.0005/seed43", 60.0), ("pearson/lr0.0005/seed44", 62.0)}
    assert doc["arms"]["pearson"]["seed_spread"] == {
        "seeds": [43, 44], "sts7_avg": [60.0, 62.0], "mean": 61.0, "half_range": 1.0}
    assert doc["arms"]["cosine_mse"]["seed_spread"] is None
    row = next(r for r in doc["runs"] if r["run"] == "cosent/lr0.0002/seed43")
    assert row["command"].startswith(".venv/bin/pcc-train --config launchers/configs/"
                                     "smollm2_arm_cosent.yaml ")
    assert "stage2.lr=0.0002" in row["command"] and "run.seed=43" in row["command"]
    assert row["stsb_dev_spearman"] == 79.0 and row["wall_seconds"] >= 0
    assert not row["resumed"]
    assert doc["sts7"][0]["run"] == "stage1" and doc["sts7"][0]["command"].startswith(
        ".venv/bin/pcc-eval --model ")
    assert doc["machine"]["cpu_model"]


def test_the_grid_grows_past_its_edge_at_most_extend_edges_times(arms, monkeypatch):
    # cosine MSE keeps improving with the lr: 2e-3 and 4e-3 run, then the cap of 2 stops it
    # and its best lr (4e-3) is chosen.
    monkeypatch.setitem(SCORES, ("cosine_mse", 2e-3), (67.0, 50.0))
    monkeypatch.setitem(SCORES, ("cosine_mse", 4e-3), (68.0, 50.0))
    assert _main(arms, "--arms", "cosine_mse", "pearson") == 0
    doc = _doc(arms)
    assert list(doc["arms"]["cosine_mse"]["dev_by_lr"]) == [
        "0.0002", "0.0005", "0.001", "0.002", "0.004"]
    assert doc["arms"]["cosine_mse"]["chosen_lr"] == 4e-3
    assert doc["arms"]["pearson"]["dev_by_lr"] == {"0.0002": 70.0, "0.0005": 80.0, "0.001": 75.0}
    # Negative control: --extend-edges 0 keeps the grid as given.
    arms.root, arms.results = arms.root.with_name("fixed"), arms.results.with_name("fixed_res")
    assert _main(arms, "--arms", "cosine_mse", "--extend-edges", "0") == 0
    assert list(_doc(arms)["arms"]["cosine_mse"]["dev_by_lr"]) == ["0.0002", "0.0005", "0.001"]


def test_grid_runs_every_arms_middle_lr_first(arms):
    assert _main(arms) == 0
    grid = [Path(_arg(c, "run.output_dir=")).parts[-2:] for c in arms.jobs[2:14]]
    assert grid[:4] == [("pearson", "lr0.0005_seed43"), ("cosine_mse", "lr0.0005_seed43"),
                        ("cosent", "lr0.0005_seed43"), ("stage1_continued", "lr0.0002_seed43")]
    assert grid[4] == ("pearson", "lr0.0002_seed43") and grid[-1] == ("stage1_continued",
                                                                       "lr0.0005_seed43")
    assert len(set(grid)) == 12
    assert set(arms.threads) == {None}  # one lane: the caller's OMP_NUM_THREADS


def test_lanes_split_the_cpus_and_give_the_same_document(arms, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(arms, "usable_cpus", lambda: 4)
    assert _main(arms) == 0
    capsys.readouterr()
    one_lane = _doc(arms)
    arms.jobs.clear()
    arms.root, arms.results = tmp_path / "arms2", tmp_path / "results2"
    arms.barrier = threading.Barrier(2)  # the first two grid runs overlap: 4 starts before 3 ends
    assert _main(arms, "--lanes", "2") == 0
    assert len(arms.jobs) == 24 and set(arms.threads[24:]) == {2}  # 4 CPUs // 2 lanes
    err = capsys.readouterr().err
    started = dict(re.findall(r"\[(\d+)/\d+\] (\S+): running", err))
    ended = dict(re.findall(r"\[(\d+)/\d+\] (\S+): done in", err))
    assert started == ended and sorted(map(int, started)) == list(range(1, 25))
    assert started["3"] == "pearson/lr0.0005/seed43"  # each job keeps its own place
    two_lanes = _doc(arms)

    def by_run(rows):
        return {r["run"]: (r.get("stsb_dev_spearman"), r.get("steps"), r.get("avg"))
                for r in rows}
    assert by_run(two_lanes["runs"]) == by_run(one_lane["runs"])
    assert by_run(two_lanes["sts7"]) == by_run(one_lane["sts7"])
    assert two_lanes["second_seed_arms"] == one_lane["second_seed_arms"]
    assert {a: e["chosen_lr"] for a, e in two_lanes["arms"].items()} == \
        {a: e["chosen_lr"] for a, e in one_lane["arms"].items()}


def test_an_arms_sts7_starts_while_a_slower_arm_still_trains(arms):
    # The grid's last run is the control at 5e-4. With 2 lanes the other lane scores the arms
    # whose grids are done instead of waiting for it; the control's own STS7 waits for it.
    # Pearson (dev 80, the best chosen) is among the two best whatever the control scores, so
    # its second seed starts at once; CoSENT (79, second) could still be passed by the control,
    # so its second seed waits for the control's choice.
    arms.slow = {"stage1_continued/lr0.0005_seed43"}
    assert _main(arms, "--lanes", "2") == 0
    end = arms.spans["stage1_continued/lr0.0005_seed43"][1]
    for arm, lr in (("pearson", "0.0005"), ("cosine_mse", "0.001"), ("cosent", "0.0002")):
        assert arms.spans[f"eval/{arm}/lr{lr}_seed43"][0] < end
    assert arms.spans["pearson/lr0.0005_seed44"][0] < end
    after = [key for key, (begin, _) in arms.spans.items() if begin >= end]
    assert {"eval/stage1_continued/lr0.0002_seed43", "cosent/lr0.0002_seed44"} <= set(after)
    assert len(_doc(arms)["sts7"]) == 7


def test_a_failed_lane_lets_the_running_job_finish_and_starts_nothing_new(arms, capsys):
    # The grid starts with pearson and cosine_mse at 5e-4, one per lane, running together.
    arms.barrier = threading.Barrier(2)
    arms.fail = {"pearson/lr0.0005_seed43"}
    assert _main(arms, "--lanes", "2") == 1
    ran = [_arg(c, "run.output_dir=") for c in arms.jobs if c[0].endswith("pcc-train")]
    # stage 1, then the two lanes' runs (in either order): nothing started after the failure.
    assert sorted(r.split("/")[-2] for r in ran) == ["arms", "cosine_mse", "pearson"]
    err = capsys.readouterr().err
    assert "[3/22] pearson/lr0.0005/seed43: failed (exit 1, log " in err  # said when it happens
    assert "pearson/lr0.0005/seed43 exited 1" in err  # and the error at the end
    # The run beside the failure finished and is in the JSON.
    assert [r["run"] for r in _doc(arms)["runs"]] == ["stage1", "cosine_mse/lr0.0005/seed43"]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_lanes_below_one_is_a_usage_error(arms, bad, capsys):
    with pytest.raises(SystemExit) as info:
        _main(arms, "--dry-run", "--lanes", bad)
    assert info.value.code == 2 and "--lanes" in capsys.readouterr().err


def test_second_invocation_skips_finished_runs_and_keeps_their_walls(arms, capsys):
    assert _main(arms) == 0
    first = _doc(arms)
    arms.jobs.clear()
    assert _main(arms) == 0
    assert arms.jobs == []
    second = _doc(arms)
    assert second["runs"] == first["runs"] and second["sts7"] == first["sts7"]
    assert "[24/24] eval/cosent/lr0.0002/seed44: finished earlier, skipped" in \
        capsys.readouterr().err


def test_an_interrupted_run_is_continued_with_the_same_command(arms):
    arms.fail = {"lr0.001_seed43"}
    assert _main(arms, "--arms", "pearson") == 1  # the third grid run dies
    ran = len(arms.jobs)
    assert ran == 5  # stage 1, its STS7, three grid runs (the last failed)
    failed = arms.jobs[-1]
    arms.fail = set()
    assert _main(arms, "--arms", "pearson") == 0
    assert arms.jobs[ran] == failed  # continued: the same pcc-train command, first to run
    row = next(r for r in _doc(arms)["runs"] if r["run"] == "pearson/lr0.001/seed43")
    assert row["resumed"] and row["wall_seconds"] is None


def test_a_run_stopped_before_its_first_checkpoint_counts_as_a_fresh_start(arms, capsys):
    arms.fail, arms.checkpoint_before_failing = {"lr0.001_seed43"}, False
    assert _main(arms, "--arms", "pearson") == 1  # its run folder exists, without a checkpoint
    arms.fail = set()
    assert _main(arms, "--arms", "pearson") == 0
    assert "pearson/lr0.001/seed43: running" in capsys.readouterr().err
    row = next(r for r in _doc(arms)["runs"] if r["run"] == "pearson/lr0.001/seed43")
    assert not row["resumed"] and row["wall_seconds"] >= 0


def test_dry_run_prints_the_plan_and_runs_nothing(arms, capsys):
    assert _main(arms, "--dry-run", "--max-steps", "2", "--grid", "cosent=1e-4") == 0
    out = capsys.readouterr().out
    assert arms.jobs == [] and not arms.root.exists()
    assert out.startswith("# 20 jobs")
    lines = [line for line in out.splitlines() if line.startswith(".venv/bin/pcc-train")]
    assert len(lines) == 1 + 3 + 3 + 1 + 3 + 1  # stage 1, the grids, a second-seed example
    assert all("max_steps=2" in line for line in lines)
    # Another --root keeps the MLflow store beside its run folders.
    assert all(f"tracking.tracking_uri=sqlite:///{arms.root}/mlflow.db" in line for line in lines)
    assert sum("smollm2_arm_cosent.yaml" in line for line in lines) == 1
    control = [line for line in lines if "stage1_continued" in line]
    assert all("stage1.max_steps=2" in line for line in control)
    # The grid's middle lr first: 2e-4, then 1e-4 and 5e-4.
    assert [_arg(line.split(), "stage1.lr=") for line in control] == ["0.0002", "0.0001", "0.0005"]


def test_epochs_scale_the_control_to_the_same_steps(arms, capsys):
    assert _main(arms, "--dry-run", "--epochs", "0.5", "--arms", "pearson",
                 "stage1_continued") == 0
    out = capsys.readouterr().out
    assert "stage2.epochs=0.5" in out
    assert "stage1.max_steps=41" in out  # int(0.5 x 83), the stage-2 arms' 41 steps


def test_a_variant_starts_from_the_studys_stage1_run_and_writes_its_own_json(arms, tmp_path):
    assert _main(arms) == 0
    study = (arms.results / "smollm2_stage2_arms.json").read_text()
    arms.jobs.clear()
    stage1 = arms.root / "stage1"
    assert arms.main(["--root", str(tmp_path / "b128"), "--results-dir", str(arms.results),
                      "--stage1-dir", str(stage1), "--out", "arms_b128", "--arms", "pearson",
                      "cosine_mse", "--grid", "pearson=5e-4", "--grid", "cosine_mse=5e-4",
                      "--", "stage2.global_batch_size=128"]) == 0
    trained = [c for c in arms.jobs if c[0].endswith("pcc-train")]
    # No stage 1 of its own: two grid runs and two second seeds, all from the study's stage 1.
    assert len(trained) == 4 and len(arms.jobs) == 8
    assert all(_arg(c, "model.name_or_path=") == str(stage1) for c in trained)
    assert all(_arg(c, "run.output_dir=").startswith(str(tmp_path / "b128")) for c in trained)
    assert all("stage2.global_batch_size=128" in c for c in trained)
    assert (arms.results / "smollm2_stage2_arms.json").read_text() == study  # untouched
    variant = json.loads((arms.results / "arms_b128.json").read_text())
    assert variant["plan"]["stage1"] == str(stage1)
    assert [r["run"] for r in variant["runs"]] == [
        "stage1", "pearson/lr0.0005/seed43", "cosine_mse/lr0.0005/seed43",
        "pearson/lr0.0005/seed44", "cosine_mse/lr0.0005/seed44"]


def test_a_variant_from_the_controls_run_names_its_command_and_runs_one_seed(arms, tmp_path):
    """Issue 20's investigation: Pcc-tuning against more contrastive steps, both from the
    control's checkpoint, with fresh seeds and no second seeds."""
    assert _main(arms) == 0
    control = arms.root / "stage1_continued" / "lr0.0002_seed43"
    study = json.loads((arms.results / "smollm2_stage2_arms.json").read_text())
    recorded = next(r for r in study["runs"] if r["run_dir"] == str(control))
    scored = next(e for e in study["sts7"] if e["run"] == recorded["run"])
    # Other benchmarks' results share the folder, in shapes of their own.
    (arms.results / "another_benchmark.json").write_text(json.dumps({"runs": [{"steps": 3}]}))
    (arms.results / "a_list.json").write_text("[1, 2]")
    arms.jobs.clear()
    assert arms.main(["--root", str(tmp_path / "more"), "--results-dir", str(arms.results),
                      "--stage1-dir", str(control), "--out", "from_control", "--arms",
                      "pearson", "stage1_continued", "--grid", "pearson=5e-4", "--grid",
                      "stage1_continued=2e-4", "--extend-edges", "0", "--second-seeds", "0",
                      "--seeds", "44", "45"]) == 0
    # Two runs at seed 44 from the control's folder and their STS7; nothing at seed 45.
    assert len(arms.jobs) == 4
    trained = [c for c in arms.jobs if c[0].endswith("pcc-train")]
    assert [_arg(c, "run.seed=") for c in trained] == ["44", "44"]
    assert all(_arg(c, "model.name_or_path=") == str(control) for c in trained)
    variant = json.loads((arms.results / "from_control.json").read_text())
    assert variant["second_seed_arms"] == [] and variant["plan"]["seeds"] == [44, 45]
    # The rows of the folder it starts from are the study's rows for it (command, seed, wall
    # time, scores), named as its stage 1; the recipe's stage-1 command would be wrong there.
    start, start_sts7 = variant["runs"][0], variant["sts7"][0]
    assert "smollm2_arm_stage1_continued.yaml" in start["command"]
    assert start == recorded | {"run": "stage1", "arm": "stage1", "recorded_in":
                                "smollm2_stage2_arms.json", "recorded_as": recorded["run"]}
    assert start["seed"] == 43 and start["wall_seconds"] is not None
    assert start_sts7["avg"] == scored["avg"] and start_sts7["recorded_as"] == recorded["run"]
    assert [e["run"] for e in variant["sts7"]] == [
        "stage1", "pearson/lr0.0005/seed44", "stage1_continued/lr0.0002/seed44"]


@pytest.mark.parametrize("subset", [["--arms", "pearson"], ["--max-steps", "2"],
                                    ["--grid", "cosent=5e-4,1e-3"]])
def test_a_plan_that_would_drop_rows_never_rewrites_the_results_json(arms, subset, capsys):
    assert _main(arms) == 0
    study = (arms.results / "smollm2_stage2_arms.json").read_text()
    arms.jobs.clear()
    capsys.readouterr()
    # One arm, a smoke budget, a shorter grid: the document would lose the study's other rows.
    assert _main(arms, *subset) == 1
    err = capsys.readouterr().err
    assert "holds rows this plan does not run (" in err and "--out NAME" in err
    assert arms.jobs == [] and (arms.results / "smollm2_stage2_arms.json").read_text() == study


def test_a_plan_that_extends_the_grid_keeps_every_row(arms):
    assert _main(arms) == 0
    before = {r["run"]: r for r in _doc(arms)["runs"]}
    arms.jobs.clear()
    assert _main(arms, "--grid", "pearson=2e-4,5e-4,1e-3,2e-3") == 0
    ran = [_span_key(c) for c in arms.jobs]
    assert ran == ["pearson/lr0.002_seed43"]  # dev 80 at 5e-4 stays the choice
    after = {r["run"]: r for r in _doc(arms)["runs"]}
    assert set(after) == set(before) | {"pearson/lr0.002/seed43"}
    assert all(after[run] == row for run, row in before.items())  # wall times included


def _fresh_machine(arms):
    """What a new checkout holds: the committed results JSON, no run folders."""
    shutil.rmtree(arms.root)
    arms.jobs.clear()


@pytest.mark.parametrize("stage1_dev, identical", [(40.0, True), (41.0, False)])
def test_a_fresh_machine_reruns_only_the_folders_a_next_job_reads(arms, capsys, stage1_dev,
                                                                  identical):
    assert _main(arms, "--arms", "pearson") == 0
    before = {r["run"]: r for r in _doc(arms)["runs"]}
    _fresh_machine(arms)
    arms.stage1_dev = stage1_dev  # the rerun reproduces the recorded stage-1 run, or does not
    # A grid extended by one lr: that run needs the stage-1 folder, and nothing else reruns.
    assert _main(arms, "--arms", "pearson", "--grid", "pearson=2e-4,5e-4,1e-3,2e-3") == 0
    assert [_span_key(c) for c in arms.jobs] == ["arms/stage1", "pearson/lr0.002_seed43"]
    after = {r["run"]: r for r in _doc(arms)["runs"]}
    rebuilt = after["stage1"].pop("rebuilt")
    assert after["stage1"] == before["stage1"]  # the row keeps what was measured first
    assert rebuilt["identical"] is identical and rebuilt["stsb_dev_spearman"] == stage1_dev
    assert rebuilt["wall_seconds"] >= 0 and not rebuilt["resumed"]
    machine = _doc(arms)["machine"]["cpu_model"]
    assert rebuilt["cpu_model"] == after["stage1"]["cpu_model"] == machine
    assert ("stage1: WARNING: its folder here differs from the recorded run" in
            capsys.readouterr().err) is not identical
    assert all(after[run] == row for run, row in before.items() if run != "stage1")
    # The next invocation finds the rebuilt folder here: its record (wall time too) stays.
    stage1_row = _doc(arms)["runs"][0]
    arms.jobs.clear()
    assert _main(arms, "--arms", "pearson", "--grid", "pearson=2e-4,5e-4,1e-3,2e-3,4e-3") == 0
    assert [_span_key(c) for c in arms.jobs] == ["pearson/lr0.004_seed43"]
    assert _doc(arms)["runs"][0] == stage1_row


def test_a_run_stopped_early_on_a_fresh_machine_keeps_every_recorded_row(arms):
    """The JSON is rewritten after each job; rows the invocation has not reached yet stay."""
    assert _main(arms, "--arms", "pearson") == 0
    before = _doc(arms)
    _fresh_machine(arms)
    arms.fail = {"pearson/lr0.002_seed43"}  # the new lr fails right after stage 1's rebuild
    assert _main(arms, "--arms", "pearson", "--grid", "pearson=2e-4,5e-4,1e-3,2e-3") == 1
    assert [_span_key(c) for c in arms.jobs] == ["arms/stage1", "pearson/lr0.002_seed43"]
    after = _doc(arms)
    for kind in ("runs", "sts7"):
        assert sorted(after[kind], key=str) == sorted(before[kind], key=str)


def test_an_sts7_on_a_fresh_machine_first_rebuilds_the_run_it_scores(arms):
    assert _main(arms, "--arms", "pearson") == 0
    _fresh_machine(arms)
    doc = _doc(arms)  # the STS7 of the chosen run (5e-4, seed 43) was never recorded
    doc["sts7"] = [e for e in doc["sts7"] if e["run"] != "pearson/lr0.0005/seed43"]
    (arms.results / "smollm2_stage2_arms.json").write_text(json.dumps(doc))
    assert _main(arms, "--arms", "pearson") == 0
    assert [_span_key(c) for c in arms.jobs] == [
        "arms/stage1", "pearson/lr0.0005_seed43", "eval/pearson/lr0.0005_seed43"]
    rows = {r["run"]: r for r in _doc(arms)["runs"]}
    assert rows["stage1"]["rebuilt"]["identical"]
    assert rows["pearson/lr0.0005/seed43"]["rebuilt"]["identical"]
    assert "rebuilt" not in rows["pearson/lr0.0005/seed44"]  # its folder was not needed


def test_its_own_file_takes_a_subset_of_the_study(arms):
    assert _main(arms) == 0
    arms.jobs.clear()
    # Every pearson job finished in the study's folders: nothing runs, its own JSON is written.
    assert _main(arms, "--arms", "pearson", "--out", "pearson_only") == 0
    assert arms.jobs == []
    assert len(json.loads((arms.results / "pearson_only.json").read_text())["runs"]) == 5


@pytest.mark.parametrize("flag, value, says", [
    ("--stage1-dir", "no/such/run", "not a finished stage-1 run"),
    ("--out", "a/b", "--out takes a file stem"),
    ("--extend-edges", "-1", "--extend-edges must be >= 0"),
    ("--second-seeds", "-1", "--second-seeds must be >= 0"),
    ("--seeds", "44 44", "--seeds takes two different seeds")])
def test_bad_variant_flags_are_usage_errors(arms, flag, value, says, capsys):
    with pytest.raises(SystemExit) as info:
        _main(arms, "--dry-run", flag, *value.split())
    assert info.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["nope=1e-4", "pearson=", "pearson=fast", "pearson=-1"])
def test_bad_grid_is_a_usage_error(arms, bad, capsys):
    with pytest.raises(SystemExit) as info:
        _main(arms, "--dry-run", "--grid", bad)
    assert info.value.code == 2 and "--grid" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_a_tiny_llama(tmp_path):
    """The real pcc-train / pcc-eval commands on a tiny Llama: one step per run, a 1-value grid
    for two arms, STS-B only. Then a second invocation runs nothing."""
    from helpers.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "llama", "llama")
    tiny = ["model.lora.r=4", "model.max_length=16", "tracking.backend=none",
            "eval.batch_size=64", "checkpoint.every_steps=1"] + [
        f"{stage}.{key}" for stage in ("stage1", "stage2")
        for key in ("global_batch_size=8", "gradcache_chunk_size=2", "max_length=16",
                    "warmup_steps=0")]
    argv = [str(ROOT / "benchmarks" / "smollm2_stage2_arms.py"), "--root", str(tmp_path / "r"),
            "--results-dir", str(tmp_path / "res"), "--arms", "pearson", "cosent",
            "--grid", "pearson=1e-3", "--grid", "cosent=1e-3", "--max-steps", "1",
            "--stage1-model", str(model), "--eval-tasks", "STSBenchmark",
            "--eval-batch-size", "64", "--", *tiny]
    python = str(Path(__import__("sys").executable))
    env = __import__("os").environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "res" / "smollm2_stage2_arms.json").read_text())
    assert [r["run"] for r in doc["runs"]] == [
        "stage1", "pearson/lr0.001/seed43", "cosent/lr0.001/seed43",
        *(f"{a}/lr0.001/seed44" for a in doc["second_seed_arms"])]
    assert all(r["steps"] == 1 and r["stsb_dev_spearman"] is not None for r in doc["runs"])
    assert all(set(e["spearman"]) == {"STSBenchmark"} for e in doc["sts7"])
    # The stage-1 run folder is read, never written, by the arms: its model/ is its own.
    assert not (tmp_path / "r" / "stage1" / "stage2").exists()
    again = subprocess.run([python, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 10
