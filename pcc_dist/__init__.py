"""pcc_dist: Pcc-tuning of sentence embedders at scale.

The public API, for notebooks and scripts (each name is imported on first use, so
``import pcc_dist`` stays light: it needs only PyYAML for the config, never torch)::

    from pcc_dist import load_config, run_training, load_embedder, evaluate_sts, load_sts7
    cfg = load_config("launchers/configs/tiny_cpu.yaml", ["run.output_dir=runs/nb"])
    result = run_training(cfg)                      # both stages, checkpoints, final eval
    embedder = load_embedder(cfg.model.__class__(name_or_path=cfg.run.output_dir))
    print(evaluate_sts(embedder, load_sts7()).avg)  # 7-task average Spearman x 100

DeepSpeed, bitsandbytes, MLflow, Triton and flash-attn are imported lazily where they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it (imported by __getattr__ on first access).
_API = {
    "PccConfig": "pcc_dist.config",
    "ConfigError": "pcc_dist.config",
    "load_config": "pcc_dist.config",
    "run_training": "pcc_dist.trainer",
    "Embedder": "pcc_dist.modeling",
    "load_embedder": "pcc_dist.modeling",
    "evaluate_sts": "pcc_dist.evaluation",
    "load_sts7": "pcc_dist.data",
    "load_sts_task": "pcc_dist.data",
    "PearsonLoss": "pcc_dist.losses",
    "InfoNCELoss": "pcc_dist.losses",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'pcc_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
