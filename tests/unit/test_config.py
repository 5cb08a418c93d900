"""Config tree: precedence, typing, and the message of every configuration error."""

import pytest
import yaml

from pcc_dist.cli import train_main
from pcc_dist.config import ConfigError, PccConfig, load_config


def problems_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def only_problem(overrides, path=None):
    problems = problems_of(overrides, path)
    assert len(problems) == 1, problems
    return problems[0]


def test_defaults_are_paper_settings():
    cfg = load_config()
    assert cfg.loss.temperature == 0.05
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (64, 16, 0.05)
    assert (cfg.stage1.lr, cfg.stage1.warmup_steps, cfg.stage1.max_length) == (5e-4, 100, 32)
    assert (cfg.stage2.data, cfg.stage2.max_length, cfg.stage2.epochs) == ("stage2", 64, 8.0)


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage2:\n  lr: 2.0e-4\n  epochs: 3\nmodel:\n  mode: lora\n")
    cfg = load_config(path, ["stage2.lr=1e-5"])
    assert cfg.stage2.lr == 1e-5          # override beats YAML
    assert cfg.stage2.epochs == 3.0       # YAML beats default, int widened to float
    assert cfg.model.mode == "lora"
    assert cfg.stage2.warmup_steps == 100  # untouched default


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["eval.tasks=[STS12, STSBenchmark]", "data.root=null",
                             "model.gradient_checkpointing=true", "stage1.lr=5e-4"])
    assert cfg.eval.tasks == ["STS12", "STSBenchmark"]
    assert cfg.data.root is None
    assert cfg.model.gradient_checkpointing is True
    assert cfg.stage1.lr == 5e-4  # "5e-4" is a YAML string; floats accept numeric strings


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["model.mode=qlora", "stage1.enabled=false"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.flat()["model.lora.r"] == 64


def test_all_problems_reported_at_once():
    problems = problems_of(["stage2.lrr=1", "model.mode=qlra", "loss.temperature=-1"])
    assert len(problems) == 3
    text = str(ConfigError(problems))
    assert text.startswith("3 configuration problem(s)")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stage2.lrr=1"], "stage2.lrr: unknown key; did you mean `stage2.lr`?"),
        (["modle.mode=lora"], "modle: unknown key; did you mean `model`?"),
        (["run.zzz=1"], "run.zzz: unknown key; valid keys here: name, output_dir, seed."),
        (["model.mode=qlra"], "model.mode: got 'qlra', expected 'full' | 'lora' | 'qlora'. "
                              "Did you mean 'qlora'?"),
        (["stage1.epochs=abc"], "stage1.epochs: got 'abc', expected float."),
        (["run.seed=1.5"], "run.seed: got 1.5, expected int."),
        (["model.gradient_checkpointing=3"],
         "model.gradient_checkpointing: got 3, expected bool."),
        (["eval.tasks=STS12"], "eval.tasks: got 'STS12', expected list of str."),
        (["stage2.max_steps=x"], "stage2.max_steps: got 'x', expected int or null."),
        (["model=3"], "model: expected a mapping of settings, got 3"),
        (["noequals"], "override 'noequals': expected `section.key=value`"),
        (["a..b=1"], "override 'a..b=1': expected `section.key=value`"),
        (["model.template=PromptEOLL"], "model.template: got 'PromptEOLL'; did you mean "
                                        "'PromptEOL'?"),
        (["model.template=hello"], "use one of PromptEOL, PromptSUM, PromptSTH or a custom "
                                   "string containing {s}."),
        (["model.kind=encoder", "model.template=PromptEOL"],
         "prompt templates are for decoder LLMs"),
        (["model.kind=encoder", "model.pooling=last"],
         "model.pooling: 'last' with model.kind='encoder'; use 'mean' or 'cls'."),
        (["model.kind=decoder", "model.pooling=cls"],
         "model.pooling: 'cls' with model.kind='decoder'"),
        (["model.name_or_path=' '"], "model.name_or_path: empty"),
        (["model.max_length=0"], "model.max_length: got 0; use a positive token count."),
        (["model.lora.r=0"], "model.lora.r: got 0; use a positive rank"),
        (["model.lora.alpha=0"], "model.lora.alpha: got 0; use a positive value"),
        (["model.lora.dropout=1.0"], "model.lora.dropout: got 1.0; use a value in [0, 1)."),
        (["model.mode=qlora", "model.dtype=fp16"], "model.qlora.compute_dtype: 'bf16' with "
                                                   "model.dtype='fp16'"),
        (["model.mode=qlora", "model.gguf_file=m.gguf"], "model.mode: 'qlora' with "
                                                         "model.gguf_file"),
        (["loss.temperature=0"], "loss.temperature: got 0.0; use a positive value"),
        (["loss.chunk_size=0"], "loss.chunk_size: got 0; use a positive integer."),
        (["stage1.data=''"], "stage1.data: got ''; name a dataset"),
        (["stage1.epochs=0"], "stage1.epochs: got 0.0; use a positive number of epochs."),
        (["stage1.max_steps=0"], "stage1.max_steps: got 0; use a positive step count"),
        (["stage2.max_length=-1"], "stage2.max_length: got -1; use a positive integer."),
        (["stage2.global_batch_size=1"],
         "stage2.global_batch_size: got 1; Pearson r and InfoNCE need at least 2"),
        (["stage2.gradcache_chunk_size=-1"], "stage2.gradcache_chunk_size: got -1; use 0 (off)"),
        (["stage2.gradcache_chunk_size=192"], "caches nothing; lower it or set 0."),
        (["stage2.lr=0"], "stage2.lr: got 0.0; use a positive learning rate"),
        (["stage2.weight_decay=-0.1"], "stage2.weight_decay: got -0.1; use a value >= 0."),
        (["stage2.warmup_steps=-5"], "stage2.warmup_steps: got -5; use a value >= 0."),
        (["stage2.grad_clip=-1"], "stage2.grad_clip: got -1.0; use 0 to disable clipping"),
        (["eval.tasks=[STS99]"], "eval.tasks: unknown task(s) ['STS99']"),
        (["eval.batch_size=0"], "eval.batch_size: got 0; use a positive integer."),
        (["eval.every_steps=-1"], "eval.every_steps: got -1; use 0 or more."),
        (["checkpoint.every_steps=0"], "checkpoint.every_steps: got 0; use a positive step"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last: got 0; keep at least 1"),
        (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite: got 0"),
        (["train.log_every_steps=0"], "train.log_every_steps: got 0; use 1 or more."),
        (["run.output_dir=''"], "run.output_dir: empty"),
    ],
)
def test_each_error_message(overrides, expected):
    assert expected in only_problem(overrides)


def test_disabled_stage_is_not_checked():
    cfg = load_config(None, ["stage1.enabled=false", "stage1.lr=0"])
    assert cfg.stage1.enabled is False


def test_yaml_file_errors(tmp_path):
    assert "file not found" in only_problem([], tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in only_problem([], bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "the top level must be a mapping" in only_problem([], listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("stage2:\n  lerning_rate: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(typo)
    assert str(typo) in str(info.value)


def test_validate_prints_resolved_config_and_exits_zero(capsys):
    assert train_main(["--validate", "stage2.lr=1e-4", "--local_rank=0"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["stage2"]["lr"] == 1e-4
    assert resolved == PccConfig().to_dict() | {"stage2": resolved["stage2"]}


def test_validate_reports_errors_with_exit_code_2(capsys):
    assert train_main(["--validate", "model.mod=lora"]) == 2
    assert "did you mean `model.mode`?" in capsys.readouterr().err
