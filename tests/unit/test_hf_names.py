"""HF Trainer / DeepSpeed habits: `--deepspeed`, `--deepspeed_config` and HF argument names."""

import pytest
import yaml

from pcc_dist.cli import train_main
from pcc_dist.config import ConfigError, load_config


def problems_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


@pytest.mark.parametrize("flag", ["--deepspeed", "--deepspeed_config", "--deepspeed=zero2"])
def test_deepspeed_flags_set_train_deepspeed_config(flag, capsys):
    argv = [flag] if "=" in flag else [flag, "zero2"]
    # The argument the `deepspeed` launcher appends still parses next to it.
    assert train_main(["--validate", *argv, "--local_rank=0"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["deepspeed_config"] == "zero2"


def test_deepspeed_flag_with_a_missing_file_names_field_and_file(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    assert train_main(["--validate", "--deepspeed", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "train.deepspeed_config" in err and str(missing) in err


def test_key_value_override_wins_over_the_flag(capsys):
    assert train_main(["--validate", "--deepspeed", "zero2",
                       "train.deepspeed_config=zero3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["deepspeed_config"] == "zero3"


@pytest.mark.parametrize(("hf", "ours", "value"), [
    ("stage2.learning_rate", ("stage2", "lr"), 1e-4),
    ("stage1.num_train_epochs", ("stage1", "epochs"), 2.0),
    ("stage2.max_grad_norm", ("stage2", "grad_clip"), 0.5),
    ("seed", ("run", "seed"), 7),
    ("output_dir", ("run", "output_dir"), "runs/x"),
    ("save_steps", ("checkpoint", "every_steps"), 50),
    ("checkpoint.save_total_limit", ("checkpoint", "keep_last"), 3),
    ("logging_steps", ("train", "log_every_steps"), 5),
    ("deepspeed", ("train", "deepspeed_config"), "zero2"),
    ("resume_from_checkpoint", ("checkpoint", "resume_from"), "runs/x/checkpoint-00000002"),
])
def test_hf_names_with_our_meaning_are_aliases(hf, ours, value, tmp_path):
    cfg = load_config(None, [f"{hf}={value}"])
    assert getattr(getattr(cfg, ours[0]), ours[1]) == value
    # The same name in a YAML recipe.
    *section, leaf = hf.split(".")
    tree = {section[0]: {leaf: value}} if section else {leaf: value}
    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert getattr(getattr(load_config(path), ours[0]), ours[1]) == value


def test_alias_problem_is_blamed_on_the_override():
    (problem,) = problems_of(["stage2.learning_rate=-1"])
    assert problem.startswith("stage2.lr") and "stage2.learning_rate=-1" in problem


def test_alias_and_its_key_in_one_file_is_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("stage2:\n  lr: 1.0e-4\n  learning_rate: 2.0e-4\n")
    (problem,) = problems_of([], path)
    assert "stage2.learning_rate" in problem and "`stage2.lr`" in problem


@pytest.mark.parametrize(("override", "names"), [
    ("stage2.per_device_train_batch_size=8", "`stage2.global_batch_size`"),
    ("stage1.warmup_ratio=0.1", "`stage1.warmup_steps`"),
    ("report_to=mlflow", "`tracking.backend`"),
    ("stage2.gradient_accumulation_steps=4", "`stage2.gradcache_chunk_size`"),
    ("learning_rate=1e-4", "`stage1.lr` and/or `stage2.lr`"),  # ambiguous at the top level
    ("train.max_grad_norm=1", "`stage1.grad_clip` and/or `stage2.grad_clip`"),
    ("train.save_steps=5", "`checkpoint.every_steps`"),
])
def test_hf_names_with_another_meaning_name_our_key(override, names):
    (problem,) = problems_of([override])
    assert override.split("=")[0] in problem and "unknown key" in problem and names in problem


def test_a_plain_typo_still_gets_did_you_mean():
    (problem,) = problems_of(["stage2.lrr=1"])
    assert "did you mean `stage2.lr`?" in problem
