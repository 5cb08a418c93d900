"""The model settings the modeling layer works from: :class:`~pcc_dist.config.ModelSettings`,
read from any config object or dict and checked (every check that needs no weights)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pcc_dist.config import ModelSettings
from pcc_dist.modeling._core import DTYPES, ModelError, _check_choice, _get
from pcc_dist.modeling.attention import ATTN_IMPLEMENTATIONS
from pcc_dist.modeling.pooling import KINDS, POOLINGS, resolve_pooling
from pcc_dist.modeling.templates import resolve_template

MODES = ("full", "lora", "qlora")
QUANT_STORAGE = ("auto", "fp32", "bf16", "fp16", "uint8")


def _read(cls: type, cfg: Any, default: Any) -> Any:
    """A ``cls`` instance with each field read from ``cfg`` (object or dict), else ``default``'s."""
    values = {}
    for f in dataclasses.fields(cls):
        fallback = getattr(default, f.name)
        if dataclasses.is_dataclass(fallback):
            values[f.name] = _read(type(fallback), _get(cfg, f.name, None), fallback)
        else:
            values[f.name] = _get(cfg, f.name, fallback)
    return cls(**values)


def model_settings(cfg: Any) -> ModelSettings:
    """``cfg`` (a :class:`ModelSettings`, a dict or any object with its fields; missing ones take
    the defaults) as a new, checked :class:`ModelSettings`.

    Raises:
        ModelError: the first setting that cannot work, naming the field, value and choices.
    """
    s = _read(ModelSettings, cfg, ModelSettings())
    s.name_or_path = str(s.name_or_path)
    s.gradient_checkpointing = bool(s.gradient_checkpointing)
    s.trust_remote_code = bool(s.trust_remote_code)
    check_model_settings(s)
    return s


def check_model_settings(s: ModelSettings) -> None:
    """Every check that needs no weights, so a bad config fails before anything is loaded."""
    _check_choice("model.kind", s.kind, KINDS)
    _check_choice("model.pooling", s.pooling, POOLINGS)
    _check_choice("model.mode", s.mode, MODES)
    _check_choice("model.dtype", s.dtype, tuple(DTYPES))
    _check_choice("model.qlora.compute_dtype", s.qlora.compute_dtype, tuple(DTYPES))
    _check_choice("model.qlora.quant_storage_dtype", s.qlora.quant_storage_dtype, QUANT_STORAGE)
    _check_choice("model.attn_implementation", s.attn_implementation, ATTN_IMPLEMENTATIONS)
    if not isinstance(s.max_length, int) or s.max_length < 1:
        raise ModelError(f"model.max_length={s.max_length!r} must be a positive integer.")
    if s.template is not None:
        resolve_template(s.template, "decoder")
    if s.kind != "auto" and s.pooling != "auto":
        resolve_pooling(s.pooling, s.kind)
    if s.mode != "full":
        if not isinstance(s.lora.r, int) or s.lora.r < 1:
            raise ModelError(f"model.lora.r={s.lora.r!r} must be a positive integer.")
        if not 0.0 <= float(s.lora.dropout) < 1.0:
            raise ModelError(f"model.lora.dropout={s.lora.dropout!r} must be in [0, 1).")
