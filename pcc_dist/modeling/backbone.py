"""Backbone loading: ``AutoModel`` in full precision or 4-bit NF4 (QLoRA), tokenizer, checkpointing.

transformers and bitsandbytes are imported inside the functions, so importing this module needs only
torch. Every read goes through :mod:`.model_files`: the folder is checked cheaply first and any
error transformers still raises becomes a :class:`ModelError` naming the folder.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pcc_dist.config import ModelSettings
from pcc_dist.modeling._core import _BNB_HINT, DTYPES, _base_config, _import_or_error
from pcc_dist.modeling.model_files import check_model_folder, reading

logger = logging.getLogger(__name__)


def _quant_config(s: ModelSettings) -> Any:
    """bitsandbytes NF4 config; the storage dtype defaults to the parameter dtype.

    ZeRO-3 partitions parameters by flattening them into buffers of one dtype; packed 4-bit weights
    stored as uint8 would sit beside bf16/fp32 parameters and could not be partitioned with them.
    Storing the packed bytes in the parameter dtype (``bnb_4bit_quant_storage``) lets ZeRO-3 shard
    them like any other tensor.
    """
    _import_or_error("bitsandbytes", "model.mode", s.mode, _BNB_HINT)
    from transformers import BitsAndBytesConfig

    storage_name = s.dtype if s.qlora.quant_storage_dtype == "auto" else s.qlora.quant_storage_dtype
    storage = torch.uint8 if storage_name == "uint8" else DTYPES[storage_name]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=s.qlora.double_quant,
        bnb_4bit_compute_dtype=DTYPES[s.qlora.compute_dtype],
        bnb_4bit_quant_storage=storage,
    )


def _load_config(source: str, gguf_file: str | None, trust_remote_code: bool) -> Any:
    """The folder's checked ``AutoConfig`` (read before the weights to validate settings early).

    Raises:
        ModelError: the folder or its config is missing, damaged or of an unknown architecture.
    """
    from transformers import AutoConfig

    check_model_folder(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    with reading("the model config", source):
        return AutoConfig.from_pretrained(source, **kwargs)


def _load_backbone(
    source: str, gguf_file: str | None, s: ModelSettings, *, quantize: bool, attn: str
) -> nn.Module:
    """``AutoModel`` from a local folder (no LM head: embeddings never need vocabulary logits).

    The folder is checked again even when :func:`_load_config` just did (exports and run folders
    load weights without reading the config first); the check reads only headers.

    Raises:
        ModelError: the folder is damaged or transformers cannot load it (its message kept).
    """
    check_model_folder(source, gguf_file=gguf_file, trust_remote_code=s.trust_remote_code)
    with reading("the model weights", source):
        model = _from_pretrained(source, gguf_file, s, quantize=quantize, attn=attn)
    if quantize:
        _disable_bnb_cpu_inference_path(model)
    if gguf_file is not None:
        _forget_gguf_origin(model)
    return model


def _from_pretrained(
    source: str, gguf_file: str | None, s: ModelSettings, *, quantize: bool, attn: str
) -> nn.Module:
    """``AutoModel.from_pretrained`` with the settings' dtype, attention and quantisation."""
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
    different rounding. Evaluation must see the numerics the adapter was trained with, so that
    path is turned off.
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
    with reading("the tokenizer", source):
        return AutoTokenizer.from_pretrained(source, **kwargs)


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
