"""Run folders: the ``pcc_embedder.json`` metadata, reading it back, and saving an embedder.

The folder layout is described in the :mod:`pcc_dist.modeling` package docstring. A *training
run folder* (``run.output_dir`` of ``pcc-train``: ``config.yaml``, ``stage1/``, ``stage2/``,
checkpoints, and at the end ``model/``) stands for its final model: :func:`resolve_training_run`
turns it into its ``model/`` run folder, so ``pcc-eval --model runs/x`` and ``pcc-export runs/x``
work as ``runs/x/model`` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcc_dist.checkpoint_manager import CheckpointManager
from pcc_dist.modeling._core import DTYPES, ModelError
from pcc_dist.modeling.embedder import Embedder
from pcc_dist.modeling.model_files import CONFIG_NAME, read_json_object

logger = logging.getLogger(__name__)


RUN_CONFIG_NAME = "pcc_embedder.json"
ADAPTER_DIR = "adapter"
RUN_FORMAT_VERSION = 1
# Keys every reader of pcc_embedder.json relies on; the others have defaults.
_REQUIRED_KEYS = ("kind", "pooling", "template", "max_length", "mode")
# What pcc-train writes into run.output_dir: the resolved config first, the final model last.
TRAINING_CONFIG_NAME = "config.yaml"
TRAINING_MODEL_DIR = "model"
_CHECKPOINTS_DIR = "checkpoints"
_BEST_DIR = "best"


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
    meta = read_json_object(path, "export or train the model again")
    version = meta.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise ModelError(
            f"{path}: format_version={version!r}; this pcc_dist reads version {RUN_FORMAT_VERSION}."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    base = meta.get("base_model")
    if meta.get("mode") != "full" and not (isinstance(base, dict) and base.get("name_or_path")):
        missing.append("base_model.name_or_path")
    if missing:
        raise ModelError(
            f"{path}: lacks {', '.join(missing)}; the file is damaged; export or train the model "
            "again."
        )
    return meta


def is_training_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the output folder of ``pcc-train`` (not a model folder)."""
    path = Path(folder)
    return (
        (path / TRAINING_CONFIG_NAME).is_file()
        and not (path / RUN_CONFIG_NAME).exists()
        and not (path / CONFIG_NAME).exists()
    )


def resolve_training_run(folder: str | os.PathLike) -> Path:
    """The folder a model is read from: a training run folder's ``model/``, else ``folder``.

    Raises:
        ModelError: ``folder`` is a training run folder whose training has not written
            ``model/`` yet; the message names the newest checkpoint to resume from.
    """
    path = Path(folder)
    if not is_training_run(path):
        return path
    model = path / TRAINING_MODEL_DIR
    # pcc_embedder.json is the last file save_embedder writes: without it model/ is half saved.
    if (model / RUN_CONFIG_NAME).is_file():
        logger.info("%s is a training run folder: using its final model %s", path, model)
        return model
    raise ModelError(_unfinished_run_message(path))


def _unfinished_run_message(run: Path) -> str:
    lines = [
        f"{run} is a training run folder without a complete {TRAINING_MODEL_DIR}/ folder: its "
        "training has not finished (or stopped before saving the final model)."
    ]
    checkpoint = newest_checkpoint(run)
    if checkpoint is not None:
        lines.append(
            f"Its newest checkpoint is {checkpoint}: run pcc-train again with "
            f"run.output_dir={run} to resume from it and write {TRAINING_MODEL_DIR}/."
        )
    else:
        lines.append(
            f"It has no complete checkpoint yet: run pcc-train with run.output_dir={run} to "
            "train it."
        )
    best = sorted(run.glob(f"*/{_BEST_DIR}/{RUN_CONFIG_NAME}"))
    if best:
        lines.append(
            f"Meanwhile {best[-1].parent} (the best model on STS-B dev so far) can be given "
            "instead."
        )
    return " ".join(lines)


def newest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of any stage (stage2's after stage1's, then by step)."""
    found = [
        checkpoint
        for stage in run.iterdir()
        if (stage / _CHECKPOINTS_DIR).is_dir()
        for checkpoint in CheckpointManager(stage / _CHECKPOINTS_DIR, 1, 0, lambda: None).complete()
    ]
    # Stage folders sort in training order (stage1 < stage2) and step names are zero-padded.
    return max(found, key=lambda p: (p.parent.parent.name, p.name), default=None)


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
