"""``benchmarks/smollm2_study.py``: a fresh study runs both stages; ``--resume`` runs only the
stages without a ``results_stage<N>.json`` and keeps the earlier rows' wall times.

The ``pcc-train`` jobs are replaced by a fake that writes the ``results.json`` a finished stage
leaves behind, so the test checks the study's bookkeeping, not training.
"""

import importlib
import json
from pathlib import Path

import pytest
from helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def study(tmp_path, monkeypatch):
    module = importlib.reload(load_benchmark("smollm2_study"))  # fresh module state per test
    import _common

    results = tmp_path / "results"
    results.mkdir()
    zeroshot = results / "smollm2_prompteol_zeroshot.json"
    zeroshot.write_text(json.dumps({"seconds": 700.0, "spearman": {"STS12": 50.0}, "avg": 50.0}))
    monkeypatch.setattr(module, "RUN_DIR", tmp_path / "run")
    monkeypatch.setattr(module, "RESULTS_DIR", results)
    monkeypatch.setattr(_common, "RESULTS_DIR", results)
    monkeypatch.setattr(module, "ZEROSHOT_JSON", zeroshot)
    module.jobs = []

    def fake_job(command):
        stage = int(command[-1].split("stage")[-1].removesuffix(".yaml"))
        module.jobs.append(stage)
        module.RUN_DIR.mkdir(exist_ok=True)
        (module.RUN_DIR / "results.json").write_text(json.dumps({
            "sts": {"spearman": {"STS12": 60.0 + stage}, "avg": 60.0 + stage, "seconds": 9.0},
            "stages": {f"stage{stage}": {"steps": 10 * stage}}}))
        return 100.0 * stage

    monkeypatch.setattr(module, "_run", fake_job)
    return module


def _rows(study):
    return json.loads((study.RESULTS_DIR / "smollm2_study.json").read_text())["rows"]


def test_fresh_study_runs_both_stages_in_a_fresh_folder(study):
    study.RUN_DIR.mkdir()
    (study.RUN_DIR / "results_stage1.json").write_text("{}")  # an older study's leftovers
    assert study.main([]) == 0
    assert study.jobs == [1, 2]
    rows = _rows(study)
    assert [(r["stage"], r["avg"], r["wall_seconds"]) for r in rows] == [
        ("zero-shot (PromptEOL)", 50.0, 700.0), ("after stage 1", 61.0, 100.0),
        ("after stage 2", 62.0, 200.0)]
    assert rows[2]["training"] == {"steps": 20}
    # The README's command, relative to the repository, not this checkout's absolute path.
    assert rows[1]["command"] == (
        ".venv/bin/pcc-train --config launchers/configs/smollm2_stage1.yaml")


def test_resume_runs_only_the_unfinished_stage_and_keeps_earlier_wall_times(study):
    assert study.main([]) == 0
    (study.RUN_DIR / "results_stage2.json").unlink()  # stage 2 was interrupted
    study.jobs.clear()
    assert study.main(["--resume"]) == 0
    assert study.jobs == [2]
    rows = _rows(study)
    assert [(r["stage"], r["wall_seconds"]) for r in rows] == [
        ("zero-shot (PromptEOL)", 700.0), ("after stage 1", 100.0), ("after stage 2", None)]
    assert (study.RUN_DIR / "results_stage2.json").is_file()
    # Control: without --resume the same folder is a fresh study again.
    study.jobs.clear()
    assert study.main([]) == 0
    assert study.jobs == [1, 2]


def test_time_steps_trains_the_stage1_recipe_and_reports_seconds_per_step(study, monkeypatch):
    """``--time-steps 2 --warmup-steps 1``: one pcc-train job of warm-up + timed steps on the
    stage-1 recipe (overrides passed through), seconds per step = global batch / pairs per s of
    the timed steps only."""
    commands = []

    def fake_train(command):
        commands.append(command)
        out = Path(next(a for a in command if a.startswith("run.output_dir=")).split("=", 1)[1])
        (out / "stage1").mkdir(parents=True)
        rates = {1: 1.0, 2: 32.0, 3: 16.0}  # step 1 is warm-up (64 s) and must not count
        (out / "stage1" / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "perf/pairs_per_s": r}) + "\n" for s, r in rates.items()))
        return 5.0

    monkeypatch.setattr(study, "_run", fake_train)
    assert study.main(["--time-steps", "2", "--warmup-steps", "1",
                       "train.single_rank_keep_zero=true"]) == 0
    (command,) = commands
    assert command[2].endswith("smollm2_stage1.yaml") and "stage1.max_steps=3" in command
    assert command[-1] == "train.single_rank_keep_zero=true"
    result = json.loads((study.RESULTS_DIR / "smollm2_step_time.json").read_text())
    assert result["global_batch"] == 64
    assert result["seconds_per_step"] == [2.0, 4.0]
    assert result["median_seconds_per_step"] == 3.0
    assert study.jobs == []  # no study stage ran


def test_time_steps_refuses_overrides_without_it(study):
    with pytest.raises(SystemExit):
        study.main(["stage1.lr=1"])
