"""The model card (README.md) of an export: what the run's own files say, nothing invented."""

import json

import yaml

from pcc_dist.config import load_config
from pcc_dist.model_card import model_card, write_model_card

META = {"kind": "decoder", "pooling": "last", "template": 'This sentence : "{s}" means in one '
        'word:"', "template_name": "PromptEOL", "max_length": 64, "mode": "full",
        "merged_from": {"mode": "qlora", "quantization": "nf4", "lora": {"r": 64, "alpha": 16},
                        "base_model": {"name_or_path": "mistralai/Mistral-7B-v0.1"}}}
STS = {"spearman": {"STS12": 82.04, "STS13": 90.84, "STS14": 86.79, "STS15": 91.1,
                    "STS16": 87.18, "STSBenchmark": 90.05, "SICKRelatedness": 87.02},
       "avg": 87.86}


def _run(tmp_path, sts=True):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    cfg = load_config(None, ["run.name=mistral_pcc", "stage2.lr=2e-4"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    stages = {"stage1": {"steps": 46, "decontamination": {
                  "removed_per_source": {"triplet": 0}, "kept": 11809, "total": 11809,
                  "removed_per_task": {}}},
              "stage2": {"steps": 300, "decontamination": {
                  "removed_per_source": {"stsb": 4798, "sickr": 133}, "kept": 5318,
                  "total": 10249, "removed_per_task": {"STS14": 1864}}}}
    (run / "results.json").write_text(json.dumps({"stages": stages, **({"sts": STS} if sts
                                                                        else {})}))
    return run


def test_card_names_base_recipe_data_sts_and_commands(tmp_path):
    run = _run(tmp_path)
    path = write_model_card(tmp_path, META, run / "model", ["pcc-export", str(run), "out"])
    text = path.read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["base_model"] == "mistralai/Mistral-7B-v0.1"
    assert header["library_name"] == "sentence-transformers"
    assert "# mistral_pcc" in text
    assert "qlora (LoRA r=64, alpha=16), merged into the nf4 base" in text
    assert "PromptEOL" in text and "lr 0.0002" in text  # the run's recipe, not the defaults
    assert "5318 of 10249 training items; 4931 removed" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == ("| STS12 | STS13 | STS14 | STS15 | STS16 | STS-B | SICK-R | Avg. |")
    assert table[2] == "| 82.04 | 90.84 | 86.79 | 91.10 | 87.18 | 90.05 | 87.02 | 87.86 |"
    assert f"pcc-train --config {run / 'config.yaml'}" in text
    assert f"pcc-export {run} out" in text


def test_card_without_run_files_says_so(tmp_path):
    text = model_card({**META, "merged_from": None, "base_model": {"name_or_path": "/m"}},
                      None, ["pcc-export", "x", "y"])
    assert "not recorded with this model (no config.yaml)" in text
    assert "No STS evaluation was recorded" in text
    assert "base_model" not in text.split("---")[1]  # a local path is no hub id
    assert "pcc-train" not in text
