"""Model kind (encoder or decoder) and pooling: which pooling fits which kind, and the pooling.

The kind decides the default pooling (decoder → last token, encoder → mask-aware mean), so both
live here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pcc_dist.config_checks import model_fit_problems
from pcc_dist.modeling._core import ModelError

KINDS = ("auto", "encoder", "decoder")
POOLINGS = ("auto", "mean", "cls", "last")


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

    Decoders: ``last`` (the default; the only token of a causal model that has read the whole
    prompt). Encoders: ``mean`` (default) or ``cls``; ``last`` would be the ``[SEP]`` separator.
    The rule is :func:`pcc_dist.config_checks.model_fit_problems`, shared with the config checks.

    Raises:
        ModelError: unknown pooling name or a pooling that does not fit the kind.
    """
    if pooling not in POOLINGS:
        raise ModelError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}.")
    if pooling == "auto":
        return "last" if kind == "decoder" else "mean"
    misfits = model_fit_problems(kind, pooling, None, f"model.kind={kind!r}")
    if misfits:
        raise ModelError(misfits[0])
    return pooling


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
