"""Tests of pcc_dist.modeling.model_files and the training-run resolution: cheap checks only.

No model is loaded here: the folders hold a config and small safetensors files written with
``safetensors.torch.save_file``. The checks through the real CLIs, on tiny models, are in
``tests/reliability/test_hostile_models_export.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pcc_dist.checkpoint import COMPLETE_MARKER
from pcc_dist.modeling import (
    ModelError,
    check_adapter_folder,
    check_model_folder,
    is_training_run,
    resolve_training_run,
)

CONFIG = {"model_type": "llama", "hidden_size": 8}


def model_folder(tmp_path: Path, shards: int = 1) -> Path:
    """A config.json and ``shards`` safetensors files (with an index when more than one)."""
    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        save_file({"w": torch.zeros(4, 4)}, folder / "model.safetensors")
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({f"w{i}": torch.zeros(4)}, folder / name)
        weight_map[f"w{i}"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_valid_folders_pass(tmp_path):
    check_model_folder(model_folder(tmp_path))
    check_model_folder(model_folder(tmp_path / "sharded", shards=3))


def test_pickled_weights_are_accepted_without_a_header_check(tmp_path):
    folder = model_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    check_model_folder(folder)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("extra bytes", "bytes of tensor data but"),
        ("length beyond the file", "header length field says"),
        ("header not JSON", "header is not valid JSON"),
        ("offsets missing", "has no valid data_offsets"),
    ],
)
def test_safetensors_damage_is_named(tmp_path, damage, needle):
    folder = model_folder(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = int.from_bytes(data[:8], "little")
    if damage == "extra bytes":
        data += b"\0" * 16
    elif damage == "length beyond the file":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "header not JSON":
        data[8] = ord("!")
    else:
        header = json.loads(data[8 : 8 + length])
        del header["w"]["data_offsets"]
        raw = json.dumps(header).encode().ljust(length)
        data[8 : 8 + length] = raw
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=needle) as info:
        check_model_folder(folder)
    assert str(weights) in str(info.value) and "copy the folder again" in str(info.value)


def test_missing_shard_and_missing_weights_are_named(tmp_path):
    folder = model_folder(tmp_path, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        check_model_folder(folder)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ModelError, match=r"no weights \(model.safetensors\)"):
        check_model_folder(bare)


def test_config_must_be_an_object_with_a_known_model_type(tmp_path):
    folder = model_folder(tmp_path)
    config = folder / "config.json"
    for text, needle in [
        ("[1, 2]", "holds a JSON list, not an object"),
        (json.dumps({"hidden_size": 8}), "no model_type"),
        (json.dumps({"model_type": "not-a-model"}), "model_type='not-a-model' is not an"),
    ]:
        config.write_text(text)
        with pytest.raises(ModelError, match=needle):
            check_model_folder(folder)
    # A folder with its own modelling code is left to transformers when the user trusts it.
    config.write_text(json.dumps({"model_type": "not-a-model", "auto_map": {}}))
    check_model_folder(folder, trust_remote_code=True)
    with pytest.raises(ModelError, match="trust_remote_code"):
        check_model_folder(folder)


def test_gguf_magic(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(16))
    check_model_folder(tmp_path, gguf_file="m.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"<html>")
    with pytest.raises(ModelError, match="not a GGUF file"):
        check_model_folder(tmp_path, gguf_file="bad.gguf")


def test_adapter_folder(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    with pytest.raises(ModelError, match="has no adapter/ folder"):
        check_adapter_folder(adapter)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="has no adapter_model.safetensors"):
        check_adapter_folder(adapter)
    save_file({"a": torch.zeros(2)}, adapter / "adapter_model.safetensors")
    check_adapter_folder(adapter)
    (adapter / "adapter_config.json").write_text('{"r": ')
    with pytest.raises(ModelError, match="adapter_config.json: not valid JSON"):
        check_adapter_folder(adapter)


def test_training_run_resolution(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "stage1" / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    assert is_training_run(run) and not is_training_run(tmp_path)
    assert resolve_training_run(tmp_path) == tmp_path  # any other folder: unchanged
    with pytest.raises(ModelError, match="no complete checkpoint yet") as info:
        resolve_training_run(run)
    assert "best" not in str(info.value)  # best/ without pcc_embedder.json is not a model
    (run / "stage1" / "best" / "pcc_embedder.json").write_text("{}")
    step = run / "stage1" / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / COMPLETE_MARKER).write_text("")
    with pytest.raises(ModelError, match="newest checkpoint is .*step-00000010") as info:
        resolve_training_run(run)
    assert f"Meanwhile {run / 'stage1' / 'best'}" in str(info.value)
    # model/ without pcc_embedder.json is a save that did not finish.
    (run / "model").mkdir()
    with pytest.raises(ModelError, match="without a complete model/"):
        resolve_training_run(run)
    (run / "model" / "pcc_embedder.json").write_text("{}")
    with caplog.at_level("INFO"):
        assert resolve_training_run(run) == run / "model"
    assert "is a training run folder: using its final model" in caplog.text
