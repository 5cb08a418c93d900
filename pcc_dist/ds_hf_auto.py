"""The ``"auto"`` values of the Hugging Face Trainer's DeepSpeed JSONs.

A stock HF ZeRO-3 JSON writes three ZeRO sizes as ``"auto"``, which the HF integration
(``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig``) fills from the model's hidden
size h; we fill them the same way:

==========================================================  =============
``zero_optimization.reduce_bucket_size``                    h * h
``zero_optimization.stage3_prefetch_bucket_size``           int(0.9 * h * h)
``zero_optimization.stage3_param_persistence_threshold``    10 * h
==========================================================  =============

h is ``hidden_size`` in the model's ``config.json`` (``model.name_or_path``; for a trained run
folder, its base model's). The same JSONs carry ``optimizer`` and ``scheduler`` blocks whose every
parameter is ``"auto"``: they ask the trainer to build both from its own arguments, which is what
pcc_dist always does (``train.optimizer``, ``<stage>.lr``, ``<stage>.warmup_steps`` ...), so such a
block is dropped (logged); a block with a hard-coded value is still refused by the resolver.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pcc_dist.config import PccConfig

logger = logging.getLogger(__name__)

_AUTO = "auto"
# DeepSpeed key -> h -> value, as the HF integration computes them.
HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
# Names of the hidden size in the configs of the architectures transformers knows.
_HIDDEN_NAMES = ("hidden_size", "d_model", "n_embd", "dim")


def fill_hidden_size_autos(ds: dict[str, Any], path: Path, cfg: PccConfig) -> list[str]:
    """Replace the hidden-size ``"auto"`` values of ``ds["zero_optimization"]`` in place.

    Returns:
        Problems: the model's hidden size cannot be read (the keys are then removed, so the
        resolver reports one problem, not one per key).
    """
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return []
    autos = [key for key in HIDDEN_SIZE_KEYS if zero.get(key) == _AUTO]
    if not autos:
        return []
    hidden, why = model_hidden_size(cfg)
    if hidden is None:
        for key in autos:
            del zero[key]
        return [f"{path}: \"zero_optimization.{autos[0]}\" is \"auto\", which is filled from the "
                f"model's hidden size, but {why}; give numbers instead (e.g. h*h for "
                "reduce_bucket_size)."]
    for key in autos:
        zero[key] = HIDDEN_SIZE_KEYS[key](hidden)
    logger.info("DeepSpeed JSON %s: %s filled from hidden size %d", path,
                ", ".join(f"{k}={zero[k]}" for k in autos), hidden)
    return []


def model_hidden_size(cfg: PccConfig) -> tuple[int | None, str]:
    """``(hidden size, "")`` of the model ``cfg.model`` names, or ``(None, why not)``."""
    from pcc_dist.modeling import ModelError, resolve_model_source

    try:
        source, gguf_file = resolve_model_source(cfg.model.name_or_path, cfg.model.gguf_file)
    except ModelError as exc:
        return None, str(exc)
    folder = Path(source)
    base = _run_base_folder(folder)
    if base is not None:
        folder = base
    if gguf_file is not None:
        return _gguf_hidden_size(folder, gguf_file)
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{config} cannot be read ({exc})"
    for name in _HIDDEN_NAMES:
        value = data.get(name)
        if isinstance(value, int) and value > 0:
            return value, ""
    return None, f"{config} has none of {', '.join(_HIDDEN_NAMES)}"


def _run_base_folder(folder: Path) -> Path | None:
    """A trained run's model folder without a config.json (LoRA adapter): its base model's."""
    from pcc_dist.modeling import ModelError, resolve_model_source
    from pcc_dist.modeling.run_folder import RUN_CONFIG_NAME, read_run_config

    if (folder / "config.json").is_file() or not (folder / RUN_CONFIG_NAME).is_file():
        return None
    try:
        base = read_run_config(folder)["base_model"]
        return Path(resolve_model_source(str(base["name_or_path"]), base.get("gguf_file"))[0])
    except (ModelError, KeyError, TypeError):
        return None


def _gguf_hidden_size(folder: Path, gguf_file: str) -> tuple[int | None, str]:
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    except (OSError, ValueError) as exc:
        return None, f"{folder / gguf_file} cannot be read ({exc})"
    return int(hf.hidden_size), ""


def drop_auto_blocks(ds: dict[str, Any], path: Path) -> None:
    """Delete ``optimizer`` / ``scheduler`` blocks whose every parameter is ``"auto"``."""
    for block in ("optimizer", "scheduler"):
        value = ds.get(block)
        params = value.get("params") if isinstance(value, dict) else None
        if isinstance(params, dict) and params and all(v == _AUTO for v in params.values()):
            del ds[block]
            logger.info("DeepSpeed JSON %s: its \"%s\" block (%s, all \"auto\") is built from "
                        "the PccConfig", path, block, value.get("type"))
