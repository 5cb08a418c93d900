"""The validated model settings (:class:`_Settings`): every check that needs no weights."""

from __future__ import annotations

import dataclasses
from typing import Any

from pcc_dist.modeling._core import DTYPES, ModelError, _check_choice, _get
from pcc_dist.modeling.attention import ATTN_IMPLEMENTATIONS
from pcc_dist.modeling.pooling import KINDS, POOLINGS, resolve_pooling
from pcc_dist.modeling.sources import ALIAS_MINILM
from pcc_dist.modeling.templates import resolve_template

MODES = ("full", "lora", "qlora")
QUANT_STORAGE = ("auto", "fp32", "bf16", "fp16", "uint8")


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
