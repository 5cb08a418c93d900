"""pcc_dist.memory_plan: parameter counts from the architecture alone (against loaded models and
Mistral-7B's published size), and the free space the checkpoints need (from a real checkpoint's
size on disk, else from the counts) as preflight and the run check it."""

from __future__ import annotations

from collections import namedtuple

import pytest
from helpers.tiny_models import model_config, save_tiny_model

from pcc_dist.config import load_config
from pcc_dist.memory_plan import checkpoint_bytes, checkpoint_space_needed, count_params
from pcc_dist.preflight import PreflightReport, check_output


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mp") / "llama", "llama")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_counts_from_the_config_equal_the_loaded_model(tiny_llama_dir, mode):
    from transformers import AutoConfig

    from pcc_dist.modeling import load_embedder

    embedder = load_embedder(model_config(name_or_path=str(tiny_llama_dir), mode=mode,
                                          template="PromptEOL", lora={"r": 4}),
                             for_training=True)
    counts = count_params(AutoConfig.from_pretrained(tiny_llama_dir), mode, lora_r=4)
    assert counts.total == sum(p.numel() for p in embedder.parameters())
    assert counts.trainable == sum(p.numel() for p in embedder.parameters() if p.requires_grad)


def test_mistral_7b_count_is_the_published_size_without_the_lm_head():
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    # 7,241,732,096 parameters with the 32000 x 4096 LM head, which AutoModel does not load.
    assert count_params(config, "full").total == 7_241_732_096 - 32000 * 4096


def _cfg(tmp_path, model, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}",
                              f"model.name_or_path={model}", "model.template=PromptEOL",
                              "checkpoint.keep_last=2", *overrides])


def test_space_is_sized_from_the_previous_checkpoint_on_disk(tmp_path, tiny_llama_dir):
    step = tmp_path / "run" / "stage1" / "checkpoints" / "step-00000010"
    (step / "engine").mkdir(parents=True)
    (step / "engine" / "shard.pt").write_bytes(b"\0" * 3_000_000)
    (step / "trainer_state.json").write_text("{}")
    needed, why = checkpoint_space_needed(_cfg(tmp_path, tiny_llama_dir))
    # keep_last 2 + the one being written, one already there: two more of its real size.
    assert needed == 2 * 3_000_002
    assert f"size the size of {step}" in why


def test_space_without_a_checkpoint_is_computed_from_the_parameter_count(tmp_path,
                                                                         tiny_llama_dir):
    small, _ = checkpoint_space_needed(
        _cfg(tmp_path, tiny_llama_dir, "model.mode=lora", "model.lora.r=4"))
    full, why = checkpoint_space_needed(_cfg(tmp_path, tiny_llama_dir))
    assert "computed from the parameter count" in why
    assert 0 < small < full  # adapters only vs every weight with its Adam state


def test_preflight_refuses_an_output_folder_too_small_for_the_checkpoints(tmp_path, monkeypatch,
                                                                          tiny_llama_dir):
    import pcc_dist.checkpoint as checkpoint_module

    cfg = _cfg(tmp_path, tiny_llama_dir)
    needed, _ = checkpoint_space_needed(cfg)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                        lambda _p: usage(10**12, 0, needed - 1))
    report = PreflightReport()
    check_output(cfg, report)
    assert len(report.problems) == 1 and "3 checkpoint(s) of" in report.problems[0]
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                        lambda _p: usage(10**12, 0, needed))
    report = PreflightReport()
    check_output(cfg, report)
    assert report.problems == []


def test_zero3_checkpoints_hold_no_weights_beside_the_partitions():
    from pcc_dist.memory_plan import ParamCounts

    big = ParamCounts(total=7 * 10**9, trainable=7 * 10**9)
    # ZeRO-3: fp32 master + two moments only (85 GB for 7.1 B); ZeRO-2 adds bf16 weights.
    assert checkpoint_bytes(big, 3, "bf16", "full") == 12 * big.trainable
    assert checkpoint_bytes(big, 2, "bf16", "full") == 14 * big.trainable
