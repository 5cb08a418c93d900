"""Run folders: the ``pcc_embedder.json`` metadata, reading it back, and saving an embedder.

The folder layout is described in the :mod:`pcc_dist.modeling` package docstring.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcc_dist.modeling._core import DTYPES, ModelError
from pcc_dist.modeling.embedder import Embedder

logger = logging.getLogger(__name__)


RUN_CONFIG_NAME = "pcc_embedder.json"
ADAPTER_DIR = "adapter"
RUN_FORMAT_VERSION = 1
# Fields of pcc_embedder.json that loading a run folder reads.
_RUN_FIELDS = ("kind", "pooling", "template", "max_length", "mode")


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``pcc_embedder.json``.

    Raises:
        ModelError: the file is missing, not a JSON object, of another format version, or lacks
            a field the loader needs (a LoRA run also needs ``base_model.name_or_path``).
    """
    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise ModelError(
            f"run folder {Path(run_dir).resolve()} has no {RUN_CONFIG_NAME}; is it a pcc_dist "
            "run or export?"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{path} is not valid JSON ({exc}); the run folder is damaged.") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != RUN_FORMAT_VERSION:
        raise ModelError(
            f"{path}: format_version={version!r}; this pcc_dist reads version {RUN_FORMAT_VERSION}."
        )
    missing = [key for key in _RUN_FIELDS if key not in meta]
    base = meta.get("base_model")
    if meta.get("mode") != "full" and not (isinstance(base, dict) and base.get("name_or_path")):
        missing.append("base_model.name_or_path")
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}; the run folder is damaged.")
    return meta


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
    """Write ``embedder`` as a run folder (layout in the package docstring).

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
