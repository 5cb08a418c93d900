"""One rank without offload trains at ZeRO-1 (pcc_dist.single_rank), unless the JSON offloads or
``train.single_rank_keep_zero`` is set; a checkpoint cut for another world size or stage loads
from its portable copy (pcc_dist.single_rank.other_layout)."""

from __future__ import annotations

import copy
import json

import pytest

from pcc_dist.config import load_config
from pcc_dist.ds_config import find_ds_config
from pcc_dist.single_rank import SINGLE_RANK_STAGE, other_layout, single_rank_ds_config


def _zero3() -> dict:
    return json.loads(find_ds_config("zero3").read_text())


def test_one_rank_drops_zero3_to_stage_1_and_says_why():
    ds, reason = single_rank_ds_config(_zero3(), 1, keep_zero=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == SINGLE_RANK_STAGE == 1
    # Stage-3-only keys go, the ones stage 1 reads stay.
    assert not any(k.startswith("stage3_") for k in zero)
    assert zero["reduce_bucket_size"] == _zero3()["zero_optimization"]["reduce_bucket_size"]
    assert "ZeRO stage 1 on one rank instead of the DeepSpeed JSON's 3" in reason
    assert "train.single_rank_keep_zero=true" in reason


@pytest.mark.parametrize(("world", "keep", "offload", "stage", "why"), [
    (2, False, None, 3, None),                              # several ranks: the JSON as written
    (1, True, None, 3, "single_rank_keep_zero=true"),       # asked to keep ZeRO-3
    (1, False, "offload_optimizer", 3, "zero_optimization.offload_optimizer"),
    (1, False, "offload_param", 3, "zero_optimization.offload_param"),
    (1, False, None, 0, "as the DeepSpeed JSON sets it"),   # already below: left alone
])
def test_the_json_stage_is_kept_where_zero_is_needed_or_asked_for(world, keep, offload, stage,
                                                                   why):
    ds = _zero3()
    ds["zero_optimization"]["stage"] = stage
    if offload:
        ds["zero_optimization"][offload] = {"device": "cpu"}
    before = copy.deepcopy(ds)
    out, reason = single_rank_ds_config(ds, world, keep_zero=keep)
    assert out == before
    assert (reason is None) if why is None else (why in reason)


def test_an_offload_section_with_device_none_does_not_count():
    ds = _zero3()
    ds["zero_optimization"]["offload_param"] = {"device": "none"}
    assert single_rank_ds_config(ds, 1, keep_zero=False)[0]["zero_optimization"]["stage"] == 1


def test_the_config_field_defaults_to_off_and_parses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1: {enabled: false}\n")
    assert load_config(str(path)).train.single_rank_keep_zero is False
    assert load_config(str(path), ["train.single_rank_keep_zero=true"]).train.single_rank_keep_zero


@pytest.mark.parametrize(("saved", "world", "stage", "other"), [
    (None, 1, 1, False),                                              # no world.json
    ({"world_size": 1, "zero_stage": 1}, 1, 1, False),
    ({"world_size": 1, "zero_stage": 1}, 2, 3, True),                 # 1-rank ZeRO-1 -> 2 ranks
    ({"world_size": 2, "zero_stage": 3}, 1, 1, True),
    ({"world_size": 1, "zero_stage": 3}, 1, 1, True),                 # forced ZeRO-3 -> default
    ({"world_size": 1, "portable": True}, 1, 1, True),                # before zero_stage: ZeRO-3
    ({"world_size": 1, "portable": False}, 1, 0, False),              # unknown: as this engine
])
def test_other_layout_decides_when_the_portable_copy_loads(saved, world, stage, other):
    assert other_layout(saved, world, stage) is other
