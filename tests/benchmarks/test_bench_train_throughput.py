"""benchmarks/train_throughput.py's pure helpers: side names, the alternating run list, the
summary and the ours / theirs ratios (the training runs themselves are the lead's benchmark;
``--quick`` takes minutes, too long for the suite)."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

tt = load_benchmark("train_throughput")


def test_sides_pair_each_stage_with_its_own_losses():
    sides = tt.sides_for(["stage2", "stage1"], ["auto", "zero3"], list(tt.ST_LOSSES))
    assert sides == ["stage2:ours_auto", "stage2:ours_zero3", "stage2:st_cosine",
                     "stage2:st_cosent", "stage1:ours_auto", "stage1:ours_zero3",
                     "stage1:st_mnrl", "stage1:st_cmnrl"]
    assert tt.parse_side("stage1:st_cmnrl") == ("stage1", "st", "cmnrl")
    assert tt.parse_side("stage2:ours_zero3_partitioned") == ("stage2", "ours",
                                                              "zero3_partitioned")


@pytest.mark.parametrize("side", ["stage2:st_mnrl", "stage3:ours_auto", "stage2:ours_zero9",
                                  "sentence_transformers", "stage1:theirs_mnrl"])
def test_unknown_or_mismatched_sides_are_refused(side):
    with pytest.raises(ValueError, match="unknown side"):
        tt.parse_side(side)


def _run(rate: float, cpu_rate: float, forward_ms: float) -> dict:
    return {"pairs_per_second": rate, "pairs_per_cpu_second": cpu_rate,
            "breakdown": {"forward": {"ms_per_step": forward_ms, "share": 0.5}},
            "padded_tokens_per_step": 100.0, "real_tokens_per_step": 60.0}


def test_summary_uses_medians_and_ratios_stay_within_a_stage():
    results = {"stage2:ours_auto": [_run(30, 20, 10), _run(90, 25, 30), _run(40, 22, 20)],
               "stage2:st_cosent": [_run(20, 10, 5), _run(25, 12, 5)],
               "stage1:ours_auto": [_run(12, 6, 1)], "stage1:st_mnrl": [_run(6, 4, 1)]}
    summary, ratios = tt.summarise(results)
    assert summary["stage2:ours_auto"]["median_pairs_per_second"] == 40
    assert summary["stage2:ours_auto"]["best_pairs_per_second"] == 90
    assert summary["stage2:ours_auto"]["mean_breakdown_ms_per_step"] == {"forward": 20.0}
    assert set(ratios) == {"stage2:ours_auto / stage2:st_cosent",
                           "stage1:ours_auto / stage1:st_mnrl"}
    assert ratios["stage2:ours_auto / stage2:st_cosent"]["median"] == pytest.approx(40 / 22.5)
    assert ratios["stage2:ours_auto / stage2:st_cosent"]["cpu_time"] == pytest.approx(22 / 11)
    assert ratios["stage1:ours_auto / stage1:st_mnrl"]["best"] == pytest.approx(2.0)


def test_every_stage_has_our_overrides_and_st_losses():
    assert {stage for stage, _ in tt.ST_LOSSES.values()} == set(tt.STAGE_OVERRIDES)
    assert "train.single_rank_keep_zero=true" in tt.VARIANTS["zero3"]["_overrides"]
    assert "_overrides" not in tt.VARIANTS["auto"]
