"""Shared pieces of the modeling layer: the error type, dtype names, config access, lazy imports.

Every other module of :mod:`pcc_dist.modeling` builds on these; this module needs only torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pcc_dist.errors import PccError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


_BNB_HINT = "pip install 'pcc-dist[qlora]' (bitsandbytes, an optional extra)"
_PEFT_HINT = "pip install 'peft>=0.13' (a core dependency of pcc-dist: pip install pcc-dist)"


class ModelError(PccError, ValueError):
    """A model setting that cannot work; the message names the field, the value and the fix.

    Args:
        message: The whole message.
        problems: The message as separate problems, one line each, when it holds several
            (``pcc-train --validate`` lists them one per line); default ``[message]``.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


def _get(cfg: Any, name: str, default: Any) -> Any:
    """Read ``cfg.name`` from the config dataclass (or any object / dict), else ``default``."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ModelError(f"{field}={value!r} is not one of {list(choices)}.")


def _import_or_error(module: str, field: str, value: Any, hint: str) -> Any:
    """Import an optional dependency lazily; if missing, raise a ModelError naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"{field}={value!r} needs {module}, which is not importable ({exc}): {hint}."
        ) from exc


def _base_config(backbone: nn.Module) -> Any:
    config = getattr(backbone, "config", None)
    if config is None and hasattr(backbone, "get_base_model"):
        config = backbone.get_base_model().config
    return config
