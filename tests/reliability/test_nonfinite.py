"""NaN/inf on ONE rank: every rank skips that step (same weights on both ranks, same counters),
and ``train.max_consecutive_nonfinite`` in a row stops the run with a message that names the
steps and the checkpoint to resume from.

The faults are injected by the test-only driver (``_faults_driver.py``) on rank 1 only:

* step 2: NaN gradients while the reported loss stays finite (a forward that overflowed in the
  replay of one rank): the skip must come from DeepSpeed's all-reduced gradient norm;
* steps 5 and 6: a NaN loss with finite gradients: ``TrainEngine.backward`` must turn it into a
  skip on every rank, or the other rank would apply the step.
"""

from __future__ import annotations

import json

import pytest
from helpers.runs import run, step_lines, tiny_llama, train_cmd

pytestmark = pytest.mark.distributed

LIMIT = 2


def test_nonfinite_on_one_rank_is_skipped_everywhere_and_a_streak_stops_the_run(
        tmp_path_factory, tmp_path):
    out = tmp_path / "run"
    record = tmp_path / "record"
    faults = {"nan": [{"step": 2, "rank": 1, "kind": "grad"},
                      {"step": 5, "rank": 1, "kind": "loss"},
                      {"step": 6, "rank": 1, "kind": "loss"}],
              "record": str(record)}
    log = tmp_path / "log.txt"
    proc = run(train_cmd(2, tiny_llama(tmp_path_factory), out,
                         f"train.max_consecutive_nonfinite={LIMIT}", driver=True),
               log, expect=None, PCC_TEST_FAULTS=json.dumps(faults))
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]

    # Both ranks took the same decision at every step, and hold the same weights after it.
    ranks = [[json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [s["step"] for s in ranks[0]] == [s["step"] for s in ranks[1]] == [1, 2, 3, 4, 5, 6]
    skipped = [s["skipped"] for s in ranks[0]]
    assert skipped == [s["skipped"] for s in ranks[1]]
    assert skipped == [False, True, False, False, True, True]
    digest = [s["digest"] for s in ranks[0]]
    assert digest == [s["digest"] for s in ranks[1]]
    # A skipped step leaves the weights as they were; the steps around it do move them.
    assert digest[1] == digest[0] and digest[4] == digest[5] == digest[3]
    assert len({digest[0], digest[2], digest[3]}) == 3

    # The step counter went on through the skips; the skip count is logged and checkpointed.
    lines = {r["step"]: r for r in step_lines(out / "stage2")}
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]
    assert [lines[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 1, 1, 1, 2, 3]
    state = json.loads((out / "stage2" / "checkpoints" / "step-00000004" / "trainer_state.json")
                       .read_text())
    assert (state["step"], state["skipped_steps"], state["consecutive_nonfinite"]) == (4, 1, 0)
    assert not (out / "stage2" / "checkpoints" / "step-00000006").exists()

    # The stop: on every rank, naming the steps and the newest checkpoint.
    resume_from = out / "stage2" / "checkpoints" / "step-00000004"
    message = (f"pcc-train: stage2: {LIMIT} consecutive steps had a non-finite loss or gradient "
               f"(steps 5-6, last at step 6)")
    assert text.count(message) == 2, text[-3000:]
    assert text.count(f"resume from {resume_from}.") == 2
