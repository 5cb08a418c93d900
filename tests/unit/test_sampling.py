"""Global batch plan: world-size independence, disjoint epochs, errors."""

import pytest

from pcc_dist.sampling import GlobalBatchPlan


def test_ranks_partition_the_global_batch_in_row_order():
    plan1 = GlobalBatchPlan(num_examples=103, global_batch_size=8, world_size=1, seed=3)
    plan2 = GlobalBatchPlan(num_examples=103, global_batch_size=8, world_size=2, seed=3)
    for step in range(30):
        union = plan2.rank_indices(step, 0) + plan2.rank_indices(step, 1)
        assert union == plan1.rank_indices(step, 0)
        assert len(plan2.rank_indices(step, 1)) == 4


def test_epoch_visits_distinct_examples_and_reshuffles():
    plan = GlobalBatchPlan(num_examples=50, global_batch_size=10, world_size=2, seed=0)
    assert plan.steps_per_epoch == 5
    epoch0 = [i for s in range(5) for i in plan.global_indices(s)]
    epoch1 = [i for s in range(5, 10) for i in plan.global_indices(s)]
    assert sorted(epoch0) == list(range(50))
    assert epoch0 != epoch1  # negative control: a new permutation each epoch
    assert plan.epoch_of(7) == 1


def test_drop_last_and_total_steps():
    plan = GlobalBatchPlan(num_examples=25, global_batch_size=10, world_size=1, seed=0)
    assert plan.steps_per_epoch == 2
    assert plan.total_steps(epochs=3) == 6
    assert plan.total_steps(epochs=0.5) == 1
    assert plan.total_steps(epochs=3, max_steps=4) == 4


def test_seed_changes_order():
    a = GlobalBatchPlan(40, 8, 1, seed=1).global_indices(0)
    b = GlobalBatchPlan(40, 8, 1, seed=2).global_indices(0)
    assert a != b


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        GlobalBatchPlan(100, 8, 3, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchPlan(5, 8, 1, 0)
