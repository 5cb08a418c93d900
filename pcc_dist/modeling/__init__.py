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

Modules (each with one job; everything is re-exported here):

* ``_core``: :class:`ModelError`, ``DTYPES``, config access and lazy optional imports.
* ``templates``: ``TEMPLATES`` and :func:`resolve_template`.
* ``pooling``: model kind and pooling: :func:`infer_kind`, :func:`resolve_pooling`, :func:`pool`.
* ``sources``: offline aliases, ``.gguf`` files and folders: :func:`resolve_model_source`.
* ``model_files``: cheap checks of a model folder's files (config, safetensors headers, adapter)
  before transformers reads them, and the net that turns its load errors into :class:`ModelError`.
* ``attention``: :func:`choose_attn_implementation`.
* ``settings``: :func:`model_settings`, any config object or dict as a checked
  :class:`~pcc_dist.config.ModelSettings`.
* ``backbone``: ``AutoModel`` load (full precision or NF4), tokenizer, gradient checkpointing.
* ``lora``: :func:`lora_target_modules`, the peft config, the frozen 4-bit base.
* ``embedder``: the :class:`Embedder` (prompting, truncation, padding, encode).
* ``run_folder``: :func:`run_metadata`, :func:`read_run_config`, :func:`save_embedder`; a
  training run folder stands for its ``model/`` (:func:`resolve_training_run`).
* ``plan``: :func:`plan_model`, every check ``load_embedder`` makes before reading weights (model
  source, ``config.json``, encoder or decoder, options that fit it); ``pcc-train --validate``
  runs it too.
* ``loading``: :func:`load_embedder`, :func:`load_embedder_from_run`; :func:`check_model_files`
  and :func:`check_run_files` check without loading.
"""

# _load_backbone, _load_tokenizer, _load_adapter and _base_source are private but
# re-exported (``x as x``): pcc_dist.export imports them from here.
from pcc_dist.modeling._core import DTYPES, ModelError
from pcc_dist.modeling.attention import ATTN_IMPLEMENTATIONS, choose_attn_implementation
from pcc_dist.modeling.backbone import _load_backbone as _load_backbone
from pcc_dist.modeling.backbone import _load_tokenizer as _load_tokenizer
from pcc_dist.modeling.embedder import Embedder
from pcc_dist.modeling.loading import (
    QUANTIZATION_CHOICES,
    check_model_files,
    check_run_files,
    load_embedder,
    load_embedder_from_run,
)
from pcc_dist.modeling.loading import _base_source as _base_source
from pcc_dist.modeling.lora import _load_adapter as _load_adapter
from pcc_dist.modeling.lora import lora_target_modules
from pcc_dist.modeling.model_files import check_adapter_folder, check_model_folder
from pcc_dist.modeling.plan import ModelPlan, plan_model
from pcc_dist.modeling.pooling import KINDS, POOLINGS, infer_kind, pool, resolve_pooling
from pcc_dist.modeling.run_folder import (
    ADAPTER_DIR,
    RUN_CONFIG_NAME,
    RUN_FORMAT_VERSION,
    TRAINING_CONFIG_NAME,
    TRAINING_MODEL_DIR,
    is_training_run,
    read_run_config,
    resolve_training_run,
    run_metadata,
    save_embedder,
)
from pcc_dist.modeling.settings import MODES, QUANT_STORAGE, model_settings
from pcc_dist.modeling.sources import ALIAS_MINILM, ALIAS_SMOLLM2, resolve_model_source
from pcc_dist.modeling.templates import DEFAULT_DECODER_TEMPLATE, TEMPLATES, resolve_template

__all__ = [
    "ADAPTER_DIR",
    "ALIAS_MINILM",
    "ALIAS_SMOLLM2",
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_DECODER_TEMPLATE",
    "DTYPES",
    "Embedder",
    "KINDS",
    "MODES",
    "ModelError",
    "ModelPlan",
    "POOLINGS",
    "QUANTIZATION_CHOICES",
    "QUANT_STORAGE",
    "RUN_CONFIG_NAME",
    "RUN_FORMAT_VERSION",
    "TEMPLATES",
    "TRAINING_CONFIG_NAME",
    "TRAINING_MODEL_DIR",
    "check_adapter_folder",
    "check_model_files",
    "check_model_folder",
    "check_run_files",
    "choose_attn_implementation",
    "infer_kind",
    "is_training_run",
    "load_embedder",
    "load_embedder_from_run",
    "lora_target_modules",
    "model_settings",
    "plan_model",
    "pool",
    "read_run_config",
    "resolve_model_source",
    "resolve_pooling",
    "resolve_template",
    "resolve_training_run",
    "run_metadata",
    "save_embedder",
]
