"""Hostile configurations through the real CLIs: ``pcc-train --validate`` and model loading (#19).

The contract under test, for each hostile case: the command exits non-zero, stderr holds no
traceback, and the message names the file, the key or option, the value and the fix. A good
config validates (exit 0, the resolved YAML on stdout), so the refusals are not an always-fail.

The cases: a DeepSpeed JSON with misspelt keys, a ZeRO stage of 7 and a value DeepSpeed refuses;
malformed JSON; a missing JSON together with bad data files, a model folder without config.json
and an unwritable output folder (every problem in one report); a prompt template on an encoder
and mean pooling on a decoder, refused by ``--validate`` and at load time by ``pcc-eval`` and
``pcc-train``. Each runs the installed console script as a subprocess (about 20 s apiece on this
2-core machine, mostly imports).

In-process, Hypothesis mutates the keys and values of the shipped ZeRO-3 JSON: the resolver
either returns or raises ConfigError naming the file, and whatever it accepts, DeepSpeed's own
config parser accepts too.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers.runs import BIN, CONFIG, ROOT, env, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from pcc_dist.config import ConfigError, load_config
from pcc_dist.ds_config import find_ds_config, resolve_ds_config

TIMEOUT = 300
MUTATIONS = settings(settings.get_profile("pcc-reliability"), max_examples=200)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (decoder, shared with the fault tests) and a tiny BERT (encoder) folder."""
    from helpers.tiny_models import save_tiny_model

    bert = save_tiny_model(tmp_path_factory.mktemp("models") / "bert", "bert")
    return {"llama": tiny_llama(tmp_path_factory), "bert": bert}


def _run(*cmd: str) -> subprocess.CompletedProcess:
    # env(): one thread, the venv first on PATH, and the test suite's own DeepSpeed op cache
    # (pcc-train builds a small op when its process group starts).
    return subprocess.run(list(cmd), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _validate(model: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _run(str(BIN / "pcc-train"), "--config", str(CONFIG), "--validate",
                f"model.name_or_path={model}", f"run.output_dir={out}", *overrides)


def _assert_refused(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


def _write_json(path: Path, payload: object) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


# -- negative control ------------------------------------------------------------------------


def test_good_config_validates(models, tmp_path):
    out = tmp_path / "run"
    proc = _validate(models["llama"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "# config OK" in proc.stderr
    assert yaml.safe_load(proc.stdout)["model"]["name_or_path"] == str(models["llama"])
    assert f"{models['llama']} ('llama' decoder; pooling last" in proc.stderr
    assert "stage1.data='nli': 11809 examples read" in proc.stderr
    assert not out.exists(), "--validate must not create the run folder"


# -- the DeepSpeed JSON ----------------------------------------------------------------------


def test_deepspeed_json_with_misspelt_keys_and_bad_values(models, tmp_path):
    ds = _write_json(tmp_path / "ds.json", {
        "train_batch_size": "auto",
        "zero_optimisation": {"stage": 3},
        "zero_optimization": {"stage": 7, "overlap_com": True,
                              "offload_param": {"device": "gpu"}}})
    proc = _validate(models["llama"], tmp_path / "run", f"train.deepspeed_config={ds}")
    _assert_refused(
        proc, "4 configuration problem(s)",
        f"{ds}: unknown key \"zero_optimisation\"; did you mean \"zero_optimization\"?",
        f"{ds}: \"zero_optimization.stage\" is 7; allowed values: 0, 1, 2, 3",
        f"{ds}: unknown key \"zero_optimization.overlap_com\"; did you mean "
        "\"zero_optimization.overlap_comm\"?",
        f"{ds}: \"zero_optimization.offload_param.device\" is \"gpu\": Input should be 'none', "
        "'cpu' or 'nvme'")


def test_malformed_deepspeed_json_names_line_and_column(models, tmp_path):
    ds = _write_json(tmp_path / "ds.json", '{\n  "zero_optimization": {"stage": 3},\n}\n')
    proc = _validate(models["llama"], tmp_path / "run", f"train.deepspeed_config={ds}")
    _assert_refused(proc, f"train.deepspeed_config: {ds} is not valid JSON: ",
                    "at line 3, column 1", "trailing comma")


def test_every_problem_at_once(models, tmp_path):
    """A missing DeepSpeed JSON, a bad row in one data file, another data file missing, a model
    folder without config.json and an output folder below a file: five lines, one report."""
    triplets = tmp_path / "nli.csv"
    triplets.write_text("sent0,sent1,hard_neg\na man plays,a person plays,a dog\n,empty,x\n")
    no_config = tmp_path / "model"
    no_config.mkdir()
    (no_config / "README.md").write_text("weights to follow\n")  # not empty, no config.json
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _validate(no_config, blocker / "run", f"train.deepspeed_config={tmp_path / 'no.json'}",
                     f"stage1.data={triplets}", f"stage2.data={tmp_path / 'missing.jsonl'}")
    _assert_refused(
        proc, "5 configuration problem(s)",
        f"train.deepspeed_config: '{tmp_path / 'no.json'}' not found",
        "built-in name: zero3, zero3_offload, zero2",
        f"stage1.data='{triplets}': {triplets}:3: ",
        f"stage2.data='{tmp_path / 'missing.jsonl'}': {tmp_path / 'missing.jsonl'}: file not "
        "found",
        f"model.name_or_path='{no_config}': {no_config / 'config.json'} not found",
        f"run.output_dir='{blocker / 'run'}': output folder {blocker / 'run'} is not writable",
        "choose another run.output_dir")


# -- options that do not fit the model -------------------------------------------------------


def test_prompt_template_on_an_encoder(models, tmp_path):
    proc = _validate(models["bert"], tmp_path / "run", "model.template=PromptEOL")
    _assert_refused(proc, "1 configuration problem(s)",
                    f"model.template: got 'PromptEOL' with model_type 'bert' in "
                    f"{models['bert'] / 'config.json'} (an encoder); prompt templates are for "
                    "decoder LLMs, set model.template=null.")


def test_mean_pooling_on_a_decoder(models, tmp_path):
    proc = _validate(models["llama"], tmp_path / "run", "model.pooling=mean")
    _assert_refused(proc, "1 configuration problem(s)",
                    f"model.pooling: 'mean' with model_type 'llama' in "
                    f"{models['llama'] / 'config.json'} (a decoder); decoders embed with the "
                    "last token, use 'last' or 'auto'.")


def test_pcc_eval_refuses_a_misfit_at_load_time(models):
    proc = _run(str(BIN / "pcc-eval"), "--model", str(models["bert"]), "--template", "PromptEOL",
                "--tasks", "STSBenchmark", "--limit", "2")
    _assert_refused(proc, "pcc-eval: model error: model.template: got 'PromptEOL' with "
                          "model_type 'bert'", "set model.template=null", code=1)


def test_pcc_train_refuses_a_misfit_at_load_time(models, tmp_path):
    """The run itself (no --validate) stops at the model load, before any weight is read."""
    proc = _run(str(BIN / "pcc-train"), "--config", str(CONFIG),
                f"model.name_or_path={models['llama']}", f"run.output_dir={tmp_path / 'run'}",
                "model.pooling=mean", "stage1.enabled=false", "data.decontaminate=false",
                "eval.tasks=[]", "eval.dev=false")
    _assert_refused(proc, "pcc-train: model.pooling: 'mean' with model_type 'llama'",
                    "use 'last' or 'auto'", code=1)


# -- DeepSpeed JSON mutations (in-process) ---------------------------------------------------

BASE = json.loads(find_ds_config("zero3").read_text())
ZERO_KEYS = sorted(BASE["zero_optimization"]) + ["offload_param", "offload_optimizer",
                                                 "sub_group_size", "zero_hpz_partition_size"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["auto", "cpu", "none", "nvme"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["device", "pin_memory", "devic", "stage", "x"]), inner, max_size=3),
    max_leaves=6)
TYPOS = st.sampled_from([
    lambda k: k[1:], lambda k: k[:-1], lambda k: k + "s", lambda k: k.upper(),
    lambda k: k.replace("z", "s"), lambda k: k.replace("_", "", 1), lambda k: k[::-1]])


@st.composite
def mutated(draw) -> dict:
    """The shipped ZeRO-3 JSON with one to three keys misspelt, set to any JSON value or
    deleted, at the top level or in zero_optimization."""
    ds = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["top", "zero_optimization", "bf16"]))
        node = ds if section == "top" else ds.get(section)
        if not isinstance(node, dict):
            continue
        keys = ZERO_KEYS if section == "zero_optimization" else sorted(node) or ["enabled"]
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["typo", "value", "delete"]))
        if action == "typo" and key in node:
            node[draw(TYPOS)(key) or "_"] = node.pop(key)
        elif action == "value":
            node[key] = draw(JSON_VALUES)
        else:
            node.pop(key, None)
    return ds


# Inputs tried by the property below, printed at the end of the run (tests/reliability/conftest.py).
TRIED: dict[str, int] = {}


@MUTATIONS
@given(ds=mutated())
def test_mutated_deepspeed_json_is_refused_with_a_message_or_accepted_by_deepspeed(ds):
    from deepspeed.runtime.config import DeepSpeedConfig

    TRIED["deepspeed_json"] = TRIED.get("deepspeed_json", 0) + 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ds.json"
        path.write_text(json.dumps(ds))
        cfg = load_config(None, [f"train.deepspeed_config={path}", "stage2.global_batch_size=8"])
        try:
            resolved = resolve_ds_config(cfg, cfg.stage2, world_size=1)
        except ConfigError as exc:
            assert exc.problems and all(str(path) in p for p in exc.problems), exc.problems
            return
    # Accepted: DeepSpeed's own parser (which deepspeed.initialize runs) must accept it too.
    DeepSpeedConfig(resolved)
