"""Helpers of ``benchmarks/peer_quality.py``: the ST dataset conversion, the trainer-identical
stage-2 pairs, lr selection by STS-B dev and the acceptance verdict."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import load_benchmark

from pcc_dist.data import ScoredPair, rescale_scores

ROOT = Path(__file__).resolve().parents[2]


pq = load_benchmark("peer_quality")


def _raw_pairs():
    return [ScoredPair("a b", "c d", 5.0, "stsb"), ScoredPair("e", "f", 0.0, "stsb"),
            ScoredPair("g h", "i", 1.0, "sickr"), ScoredPair("j", "k l", 4.2, "sickr"),
            ScoredPair("m", "n", 2.5, "stsb")]


def test_st_columns_keep_every_pair_in_order_with_scaled_scores():
    scaled = rescale_scores(_raw_pairs())
    columns = pq.st_columns(scaled)
    assert list(columns) == ["sentence1", "sentence2", "score"]  # label column last
    assert columns["sentence1"] == ["a b", "e", "g h", "j", "m"]
    assert columns["sentence2"] == ["c d", "f", "i", "k l", "n"]
    # stsb s/5, sickr (s-1)/4: the trainer's per-source scaling, carried over unchanged.
    assert columns["score"] == pytest.approx([1.0, 0.0, 0.0, 0.8, 0.5])
    assert columns["score"] == [p.score for p in scaled]


def test_st_columns_refuse_unscaled_scores():
    # Negative control: raw 0-5 labels would silently change CosineSimilarityLoss's objective.
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*index 0: 5.0"):
        pq.st_columns(_raw_pairs())


def test_st_columns_round_trip_through_a_datasets_table():
    datasets = pytest.importorskip("datasets")
    scaled = rescale_scores(_raw_pairs())
    table = datasets.Dataset.from_dict(pq.st_columns(scaled))
    assert table.num_rows == len(scaled)
    assert [(r["sentence1"], r["sentence2"]) for r in table] == \
        [(p.sentence1, p.sentence2) for p in scaled]
    assert [r["score"] for r in table] == pytest.approx([p.score for p in scaled])


def test_select_by_dev_picks_the_best_dev_and_the_earlier_on_ties():
    runs = [{"lr": 2e-5, "dev": 85.0}, {"lr": 5e-5, "dev": 86.0}, {"lr": 1e-4, "dev": 86.0}]
    assert pq.select_by_dev(runs)["lr"] == 5e-5
    assert pq.select_by_dev(runs[:1])["lr"] == 2e-5


def test_select_by_dev_skips_missing_and_nan_scores():
    runs = [{"lr": 2e-5, "dev": math.nan}, {"lr": 5e-5, "dev": None}, {"lr": 1e-4, "dev": 80.0}]
    assert pq.select_by_dev(runs)["lr"] == 1e-4
    with pytest.raises(ValueError, match="no candidate"):
        pq.select_by_dev(runs[:2])


def test_verdict_compares_ours_with_the_best_peer():
    passed = pq.verdict({"pcc": 80.0, "cosent": 79.5, "angle": 79.9, "cosine": 78.0})
    assert passed["best_peer"] == "angle"
    assert passed["ours_at_least_best_peer"] is True
    assert passed["margin"] == pytest.approx(0.1)
    failed = pq.verdict({"pcc": 79.0, "cosent": 79.5})
    assert failed["ours_at_least_best_peer"] is False
    assert failed["margin"] == pytest.approx(-0.5)


def test_stage2_pairs_equal_what_the_trainer_trains_on():
    """The benchmark's pairs are exactly StageRunner.load_examples' (same decontamination and
    scaling), on the real data when it is present."""
    from pcc_dist.config import PccConfig
    from pcc_dist.data import DataError, load_sts7, resolve_data_root
    from pcc_dist.trainer import StageRunner

    try:
        root = resolve_data_root()
        tasks = load_sts7(root)
    except DataError as exc:
        pytest.skip(f"real data not available: {exc}")
    ours, report = pq.load_stage2_pairs(root, tasks)
    cfg = PccConfig()
    runner = StageRunner(cfg, "stage2", SimpleNamespace(rank=0, world_size=1), root, tasks, None)
    trainer_pairs, trainer_report = runner.load_examples()
    assert ours == trainer_pairs
    assert report == trainer_report
    assert len(ours) == 5318  # the README's count
    assert all(0.0 <= p.score <= 1.0 for p in ours)
    columns = pq.st_columns(ours)
    assert len(columns["score"]) == len(ours)


