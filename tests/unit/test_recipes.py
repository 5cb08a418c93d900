"""Every recipe in launchers/configs/ passes `pcc-train --validate`; its DeepSpeed JSON fits."""

from pathlib import Path

import pytest
import yaml

from pcc_dist.cli import train_main
from pcc_dist.config import load_config
from pcc_dist.ds_config import resolve_ds_config
from pcc_dist.modeling import ModelError, resolve_model_source

RECIPES = sorted((Path(__file__).resolve().parents[2] / "launchers" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from helpers.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama")


# The recipes whose model is a hub id: offline (this machine, CI) `--validate` as given stops at
# the model, naming it; every other recipe validates as given from a fresh clone.
HUB_RECIPES = {
    "llama2_7b_qlora_stage1.yaml": "meta-llama/Llama-2-7b-hf",
    "llama2_7b_qlora_stage2.yaml": "meta-llama/Llama-2-7b-hf",
    "mistral7b_full_zero3.yaml": "mistralai/Mistral-7B-v0.1",
    "mistral7b_qlora_stage1.yaml": "mistralai/Mistral-7B-v0.1",
    "mistral7b_qlora_stage2.yaml": "mistralai/Mistral-7B-v0.1",
}


def _model_override(recipe: Path, tiny_llama: Path) -> list[str]:
    """`--validate` checks the model folder as the run does. The 7B recipes name hub ids (a folder
    of that name where they run), which this machine does not have, so for the rest of their
    checks they are validated with a tiny Llama decoder in its place (their templates and
    poolings are decoder ones). Everything else is the recipe's own."""
    try:
        resolve_model_source(load_config(recipe).model.name_or_path)
    except ModelError:
        return [f"model.name_or_path={tiny_llama}"]
    return []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_as_given(recipe, capsys, tmp_path, monkeypatch):
    """`pcc-train --config RECIPE --validate`, nothing added: the exact outcome per recipe."""
    monkeypatch.setenv("PCC_CACHE_DIR", str(tmp_path))  # where tiny:llama is built
    code = train_main(["--config", str(recipe), "--validate"])
    err = capsys.readouterr().err
    hub_id = HUB_RECIPES.get(recipe.name)
    if hub_id is None:
        assert code == 0, err
        assert err.rstrip().endswith("# config OK")
    else:
        assert code == 2 and f"model.name_or_path={hub_id!r}" in err, err
        assert err.count("  - ") == 1, err  # the model is the only problem


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny_cpu.yaml", "demo_minilm.yaml", "mistral7b_qlora_stage1.yaml",
            "mistral7b_qlora_stage2.yaml", "mistral7b_full_zero3.yaml",
            "llama2_7b_qlora_stage1.yaml", "llama2_7b_qlora_stage2.yaml",
            "smollm2_stage1.yaml", "smollm2_stage2.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe, capsys, tiny_llama):
    """The hub-id recipes pass every other check with a local model in their model's place (the
    others validate as given above); every recipe's DeepSpeed JSON fits 2 ranks."""
    if recipe.name in HUB_RECIPES:
        overrides = _model_override(recipe, tiny_llama)
        assert train_main(["--config", str(recipe), "--validate", *overrides]) == 0
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert resolved["run"]["output_dir"]
    cfg = load_config(recipe)
    for name in ("stage1", "stage2"):
        stage = getattr(cfg, name)
        if stage.enabled:
            ds = resolve_ds_config(cfg, stage, world_size=2)
            assert ds["train_batch_size"] == stage.global_batch_size
            assert ds["train_micro_batch_size_per_gpu"] == stage.global_batch_size // 2


def test_paper_settings_in_the_qlora_recipes():
    stage1 = load_config(next(p for p in RECIPES if p.name == "mistral7b_qlora_stage1.yaml"))
    stage2 = load_config(next(p for p in RECIPES if p.name == "mistral7b_qlora_stage2.yaml"))
    for cfg in (stage1, stage2):
        assert (cfg.model.mode, cfg.model.template) == ("qlora", "PromptSUM")
        assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (64, 16, 0.05)
        assert cfg.run.output_dir == "runs/mistral7b_pcc"  # stage 2 continues stage 1's adapter
    assert (stage1.stage1.lr, stage1.stage1.global_batch_size, stage1.stage1.max_length) == (
        5e-4, 256, 32)
    assert (stage2.stage2.lr, stage2.stage2.epochs, stage2.stage2.max_length) == (5e-4, 8, 64)
