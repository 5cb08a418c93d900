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
# The SmolLM2 stage-2 arms (issue 20) start from the stage-1 run folder that
# smollm2_arms_stage1.yaml writes: before that run, `--validate` as given stops at the model.
STAGE1_RUN = "runs/smollm2_arms/stage1"
ARM_OBJECTIVES = ("pearson", "cosine_mse", "cosent")
ARM_RECIPES = {f"smollm2_arm_{arm}.yaml": STAGE1_RUN
               for arm in (*ARM_OBJECTIVES, "stage1_continued")}
NEEDS_MODEL = HUB_RECIPES | ARM_RECIPES


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
    if recipe.name in ARM_RECIPES:
        # Their model is a run folder under runs/, relative to the working directory: as in a
        # fresh checkout, whatever this checkout's runs/ holds.
        monkeypatch.chdir(tmp_path)
    code = train_main(["--config", str(recipe), "--validate"])
    err = capsys.readouterr().err
    hub_id = NEEDS_MODEL.get(recipe.name)
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
            "smollm2_stage1.yaml", "smollm2_stage2.yaml", "smollm2_arms_stage1.yaml",
            *ARM_RECIPES} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe, capsys, tiny_llama):
    """The hub-id recipes pass every other check with a local model in their model's place (the
    others validate as given above); every recipe's DeepSpeed JSON fits 2 ranks."""
    if recipe.name in NEEDS_MODEL:
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


def _recipe(name: str):
    return load_config(next(p for p in RECIPES if p.name == name))


def test_smollm2_arms_differ_in_the_objective_only():
    """Issue 20: the stage-2 arms are one recipe but for loss.stage2_objective (and the run's
    name and folder); the control continues stage 1's InfoNCE recipe for as many steps."""
    arms = {arm: _recipe(f"smollm2_arm_{arm}.yaml") for arm in ARM_OBJECTIVES}
    flats = {}
    for arm, cfg in arms.items():
        assert cfg.loss.stage2_objective == arm
        assert cfg.model.name_or_path == STAGE1_RUN and cfg.eval.dev
        flats[arm] = {k: v for k, v in cfg.flat().items()
                      if k not in ("loss.stage2_objective", "run.name", "run.output_dir")}
    assert flats["pearson"] == flats["cosine_mse"] == flats["cosent"]
    pcc = arms["pearson"].stage2
    assert (pcc.global_batch_size, pcc.max_length, pcc.epochs, pcc.max_steps) == (64, 64, 1, None)
    stage1 = _recipe("smollm2_arms_stage1.yaml").stage1
    control = _recipe("smollm2_arm_stage1_continued.yaml")
    assert control.model.name_or_path == STAGE1_RUN and not control.stage2.enabled
    # Same budget: 1 epoch of the 5,318 de-contaminated pairs at batch 64 (the plan drops the
    # last partial batch), in steps of as many examples.
    assert control.stage1.max_steps == 5318 // pcc.global_batch_size == 83
    for key in ("data", "global_batch_size", "max_length"):
        assert getattr(control.stage1, key) == getattr(stage1, key), key
    # The arms run without the gradient cache, all of them alike (exact either way:
    # tests/distributed/test_gradcache_zero3.py).
    assert control.stage1.gradcache_chunk_size == pcc.gradcache_chunk_size == 0
    assert control.stage1.warmup_steps == pcc.warmup_steps


def test_an_arm_starts_from_exactly_the_stage1_weights(tmp_path):
    """model.name_or_path = the stage-1 run folder: the arm's trainable adapter is the stage-1
    adapter, bit for bit, after the same seeding the trainer does (StageRunner.build_model).
    Negative control: the base model in its place gives a fresh adapter."""
    import torch
    from helpers.tiny_models import save_tiny_model

    from pcc_dist.modeling import load_embedder, save_embedder
    from pcc_dist.trainer import seed_everything

    base = save_tiny_model(tmp_path / "llama", "llama")
    stage1_cfg = load_config(next(p for p in RECIPES if p.name == "smollm2_arms_stage1.yaml"),
                             [f"model.name_or_path={base}", "model.lora.r=4"])
    trained = load_embedder(stage1_cfg.model, for_training=True)
    with torch.no_grad():  # stand-in for stage-1 training: every adapter weight moves
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param))
    want = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    run = tmp_path / "stage1_run"
    save_embedder(trained, run / "model")
    (run / "config.yaml").write_text(stage1_cfg.to_yaml())

    def arm_adapter(name_or_path):
        cfg = load_config(next(p for p in RECIPES if p.name == "smollm2_arm_cosent.yaml"),
                          [f"model.name_or_path={name_or_path}"])
        seed_everything(cfg.run.seed)
        arm = load_embedder(cfg.model, for_training=True)
        return {n: p for n, p in arm.named_parameters() if p.requires_grad}

    got = arm_adapter(run)
    assert set(got) == set(want)
    assert all(torch.equal(got[n], w) for n, w in want.items())
    fresh = arm_adapter(base)
    assert not any(torch.equal(fresh[n], w) for n, w in want.items() if "lora_B" in n)
