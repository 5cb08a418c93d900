"""Config tree: precedence, typing, and the message of every configuration error."""

from dataclasses import dataclass

import pytest
import yaml

from pcc_dist.cli import train_main
from pcc_dist.config import ConfigError, PccConfig, load_config
from pcc_dist.config_docs import config_leaves, show_value


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
        (["data.score_range=[5, 0]"], "data.score_range: got [5.0, 0.0]; give [low, high] with "
                                      "low < high"),
        (["data.score_range=[0, 1, 2]"], "data.score_range: got [0.0, 1.0, 2.0]"),
        (["data.score_range=[0, .inf]"], "data.score_range: got [0.0, inf]"),
        (["loss.stage2_objective=mse"], "loss.stage2_objective: got 'mse', expected 'pearson' | "
                                        "'cosine_mse' | 'cosent'."),
        (["loss.cosent_scale=0"], "loss.cosent_scale: got 0.0; use a positive value"),
        (["loss.stage2_objective=cosine_mse", "data.score_scaling=none"],
         "loss.stage2_objective: 'cosine_mse' with data.score_scaling='none'"),
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


@pytest.mark.parametrize(("override", "field", "value"), [
    ("model.template=Query: {s}", "template", "Query: {s}"),  # YAML: {'Query': {'s': None}}
    ("model.template=- {s}", "template", "- {s}"),  # YAML: a list
    ("model.template=null", "template", None),
    ("model.name_or_path=007", "name_or_path", "007"),  # YAML: the integer 7
    ('model.name_or_path="a: b"', "name_or_path", "a: b"),  # quoted: YAML's reading
])
def test_text_fields_take_the_override_as_typed(override, field, value):
    cfg = load_config(None, [override, "model.kind=decoder"])
    assert getattr(cfg.model, field) == value


def test_score_range_accepts_a_pair_of_numbers():
    cfg = load_config(None, ["data.score_range=[0, 5]"])
    assert cfg.data.score_range == [0.0, 5.0] and cfg.data.score_bounds == (0.0, 5.0)
    assert load_config().data.score_bounds is None


def test_problems_name_the_override_that_caused_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage2:\n  lr: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.lora={r: 0}", "modle.mode=lora", "stage1.lr=1e-4"])
    header, *lines = str(info.value).splitlines()
    assert header == f"3 configuration problem(s) in {path} and the command-line overrides:"
    assert lines[0] == "  - stage2.lr: got -1.0; use a positive learning rate such as 5e-4."
    assert sorted(lines[1:]) == [
        "  - model.lora.r: got 0; use a positive rank such as 64. (from the command-line "
        "override `model.lora={r: 0}`)",
        "  - modle: unknown key; did you mean `model`? (from the command-line override "
        "`modle.mode=lora`)"]  # and the valid stage1.lr override is blamed for nothing


def test_header_names_only_the_overrides_when_the_file_is_fine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage2:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["stage2.lr=-1"], labels={"stage2.lr=-1": "--lr -1"})
    assert str(info.value).startswith("1 configuration problem(s) in the command-line overrides:")
    assert info.value.problems[0].endswith("(from --lr -1)")


def _alias_levels(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nrun:\n  name: *l{levels - 1}\n"


def test_alias_bomb_is_refused_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_levels(9))  # 9^9 = 387M values from under 700 bytes
    assert path.stat().st_size < 700
    message = only_problem([], path)
    assert len(message) < 300
    assert message.startswith(f"--config {path}: refused: its anchors and aliases expand to "
                              "more than 10,000 values")


def test_moderate_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("stage1: &base {lr: 1.0e-4, warmup_steps: 7}\n"
                    "stage2: {<<: *base, lr: 3.0e-4}\n"
                    "model: {lora: {target_modules: [q_proj, v_proj]}}\n"
                    "tracking: {experiment: &e pcc}\nrun: {name: *e}\n")
    cfg = load_config(path)
    assert (cfg.stage2.lr, cfg.stage2.warmup_steps) == (3e-4, 7)
    assert (cfg.model.lora.target_modules, cfg.run.name) == (["q_proj", "v_proj"], "pcc")


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("eval:\n  tasks: &a [*a]\n")
    assert "refers to the node that contains it" in only_problem([], path)


def test_triton_kernel_without_cuda_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    problem = only_problem(["loss.kernel=triton"])
    assert problem.startswith("loss.kernel: got 'triton'; kernel='triton' needs a CUDA GPU")
    assert "Use kernel='auto' or kernel='torch'" in problem
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter (tests) stays allowed
    assert load_config(None, ["loss.kernel=triton"]).loss.kernel == "triton"
    # The stage-2 alternatives to Pearson have no Triton kernel: asking for one is an error,
    # unless stage 2 does not run.
    problem = only_problem(["loss.kernel=triton", "loss.stage2_objective=cosent"])
    assert problem.startswith("loss.kernel: 'triton' with loss.stage2_objective='cosent', which "
                              "has no Triton kernel")
    assert load_config(None, ["loss.kernel=triton", "loss.stage2_objective=cosent",
                              "stage2.enabled=false"]).loss.kernel == "triton"


def _help_text(capsys) -> str:
    with pytest.raises(SystemExit) as info:
        train_main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _undocumented(leaves) -> list[str]:
    return [leaf.key for leaf in leaves if not leaf.doc.strip()]


def test_help_documents_every_config_leaf_with_its_default(capsys):
    """`pcc-train --help` lists each leaf with type, default and doc; the default as shown is an
    override that gives the default back."""
    text = _help_text(capsys)
    leaves = config_leaves(PccConfig())
    assert len(leaves) >= 60 and _undocumented(leaves) == []
    lines = text.splitlines()
    for leaf in leaves:
        head = f"  {leaf.key} ({leaf.type}; default {show_value(leaf.default)})"
        assert head in lines, head
        doc_line = lines[lines.index(head) + 1].strip()
        assert doc_line and leaf.doc.startswith(doc_line.split()[0]), (leaf.key, doc_line)
        section, _, name = leaf.key.rpartition(".")
        node = load_config(None, [f"{leaf.key}={show_value(leaf.default)}"])
        for part in section.split("."):
            node = getattr(node, part)
        assert getattr(node, name) == leaf.default, leaf.key


def test_doc_check_catches_a_field_without_a_doc():
    """Negative control of the doc check above: a field with no string under it is reported."""

    @dataclass
    class Half:
        documented: int = 1
        """Has a doc."""
        bare: int = 2

    assert _undocumented(config_leaves(Half())) == ["bare"]
