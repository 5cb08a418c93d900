"""Tests of train/test de-contamination (pcc_dist.data.decontamination)."""

from __future__ import annotations

import json

import pytest

from pcc_dist.data import (
    DataError,
    DecontaminationReport,
    ScoredPair,
    StsTask,
    Triplet,
    decontaminate,
    load_sts7,
    load_training_set,
    normalise_text,
    resolve_data_root,
)

# Test-side text is SentEval-processed: Moses-tokenised and lower-cased.
TEST_TASKS = {
    "STS12": StsTask("STS12", {
        "MSRvid": [ScoredPair("a man ' s dog is running .", "the dog runs fast .", 4.0)],
        "OnWN": [ScoredPair("i don 't know .", "no idea .", 3.0)],
    }),
    "SICKRelatedness": StsTask("SICKRelatedness", {
        "test": [ScoredPair("A kid is playing", "A child plays", 4.5)]}),
}


@pytest.mark.parametrize("raw, tokenised", [
    ("A man's dog is running.", "a man ' s dog is running ."),
    ("I don't know...", "i don 't know ."),
    ("  Tabs\tand   SPACES ", "tabs and spaces"),
    ("Caf\u00e9 \u2014 \uff21BC", "café - abc"),  # NFKC folds the full-width letter
])
def test_normalise_text_bridges_raw_and_senteval_text(raw, tokenised):
    assert normalise_text(raw) == normalise_text(tokenised)


def test_normalise_text_keeps_words_distinct():
    assert normalise_text("Two men play chess.") != normalise_text("Three men play chess.")
    assert normalise_text("?!.") == ""


def test_planted_overlap_removed_in_either_order_with_case_and_punctuation():
    training = [
        ScoredPair("The dog runs fast!", "A man's dog is running.", 4.2, "stsb"),  # swapped order
        ScoredPair("I DON'T know", "No idea", 3.1, "stsb"),                      # case/punct
        ScoredPair("A kid is playing.", "A child plays.", 4.0, "sickr"),
        ScoredPair("A man's dog is running.", "A cat sleeps.", 1.0, "stsb"),     # one side only
        ScoredPair("Fresh sentence.", "Another fresh one.", 2.0, "sickr"),       # control
    ]
    kept, report = decontaminate(training, TEST_TASKS)
    assert kept == training[3:]
    assert report.removed_per_source == {"stsb": 2, "sickr": 1}
    assert report.total_per_source == {"stsb": 3, "sickr": 2}
    assert (report.total, report.kept, report.removed) == (5, 2, 3)
    assert report.removed_per_task == {"STS12": 2, "SICKRelatedness": 1}
    assert report.removed_per_source_task == {"stsb": {"STS12": 2, "SICKRelatedness": 0},
                                              "sickr": {"STS12": 0, "SICKRelatedness": 1}}
    assert report.test_pairs == {"STS12": 2, "SICKRelatedness": 1}
    assert report.examples[0]["tasks"] == ["STS12"]


def test_negative_control_nothing_in_common_keeps_everything():
    training = [ScoredPair("Fresh sentence.", "Another fresh one.", 2.0, "stsb"),
                ScoredPair("a man ' s dog is running .", "the dog walks slowly .", 2.0, "stsb")]
    kept, report = decontaminate(training, TEST_TASKS)
    assert kept == training
    assert report.removed_per_source == {"stsb": 0}
    assert report.removed == 0 and report.examples == []


def test_triplets_matched_on_anchor_and_positive():
    triplets = [Triplet("A man's dog is running", "The dog runs fast", "A cat sleeps"),
                Triplet("Unrelated anchor", "Unrelated positive", None),
                Triplet("Other anchor", "A kid is playing", "A child plays")]  # negative only
    kept, report = decontaminate(triplets, TEST_TASKS)
    assert kept == triplets[1:]
    assert report.removed_per_source == {"triplet": 1}


def test_pair_in_two_tasks_counts_in_both_but_removed_once():
    tasks = {**TEST_TASKS, "STSBenchmark": StsTask("STSBenchmark", {
        "test": [ScoredPair("no idea .", "i don 't know .", 3.0)]})}
    kept, report = decontaminate([ScoredPair("I don't know.", "No idea.", 3.0, "stsb")], tasks)
    assert kept == [] and report.removed == 1
    assert report.removed_per_task == {"STS12": 1, "SICKRelatedness": 0, "STSBenchmark": 1}


def test_report_to_dict_is_json_ready():
    _, report = decontaminate([ScoredPair("I don't know", "no idea", 3.0, "stsb")], TEST_TASKS)
    assert isinstance(report, DecontaminationReport)
    restored = json.loads(json.dumps(report.to_dict()))
    assert restored["removed"] == 1 and restored["removed_per_source"] == {"stsb": 1}


def test_real_stage2_overlap_against_sts7():
    """Pins the measured overlap of stage2/stsb_sickr_train.jsonl with the STS7 test sets.

    STS-B was assembled from STS 2012-2016 data, so most STS-B train pairs are STS12-16 test
    pairs; SICK train shares some pairs with SICK test and with STS12 MSRvid.
    """
    try:
        root = resolve_data_root()
    except DataError as exc:
        pytest.skip(f"shared data folder absent: {exc}")
    kept, report = decontaminate(load_training_set("stage2", root), load_sts7(root))
    assert report.total == 10249
    assert report.removed_per_source == {"stsb": 4798, "sickr": 133}
    assert len(kept) == report.kept == 10249 - 4931
    assert report.removed_per_task["STS14"] == 1864
