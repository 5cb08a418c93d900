"""The DeepSpeed JSON of a run: find it, check it, fill the fields the TrainConfig owns.

:func:`resolve_ds_config` reads a DeepSpeed JSON (a path or a built-in name ``zero3``,
``zero3_offload``, ``zero2``) and fills every field the TrainConfig owns. The JSON writes them as
``"auto"``; a hard-coded value that disagrees with the TrainConfig, an ``optimizer`` or
``scheduler`` block, or an ``"auto"`` on a field we do not own is a :class:`ConfigError`. The
training engine (:func:`pcc_dist.engine.build_engine`) and ``pcc-train --validate`` both call it.

Fields owned by the TrainConfig (DeepSpeed key <- pcc_dist field):

======================================  ===============================================
``train_batch_size``                    ``<stage>.global_batch_size`` (N)
``train_micro_batch_size_per_gpu``      ``N / W`` (W must divide N)
``gradient_accumulation_steps``         ``1`` (each loss covers the whole global batch)
``gradient_clipping``                   ``<stage>.grad_clip`` (0 disables clipping)
``bf16.enabled`` / ``fp16.enabled``     ``model.dtype``
======================================  ===============================================
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from pcc_dist.config import ConfigError, PccConfig, StageSettings

logger = logging.getLogger(__name__)

BUILTIN_DS_CONFIGS = ("zero3", "zero3_offload", "zero2")
# The repository root (…/pcc_dist/ds_config.py -> …): built-in JSONs live in <root>/ds_configs/.
_REPO_ROOT = Path(__file__).resolve().parent.parent
# Where the built-in DeepSpeed configs are: the repository's ds_configs/ (a checkout or an
# editable install), else the copy a wheel installs under <prefix>/share (setup.py data_files).
_DS_CONFIG_DIRS = (_REPO_ROOT / "ds_configs",
                   Path(sys.prefix) / "share" / "pcc_dist" / "ds_configs")
_AUTO = "auto"


def _stage_name(cfg: PccConfig, stage: StageSettings) -> str:
    for name in ("stage1", "stage2"):
        if getattr(cfg, name) is stage:
            return name
    return "stage"


def find_ds_config(spec: str) -> Path:
    """Resolve ``train.deepspeed_config``: a built-in name or a path.

    Built-in names map to ``ds_configs/<name>.json`` in the repository, or in
    ``<sys.prefix>/share/pcc_dist/`` for a wheel install. A relative path is tried from the
    working directory first, then from the repository root (so the default
    ``ds_configs/zero3.json`` works from any directory).

    Raises:
        ConfigError: when no file is found.
    """
    if spec in BUILTIN_DS_CONFIGS:
        candidates = [folder / f"{spec}.json" for folder in _DS_CONFIG_DIRS]
    else:
        path = Path(spec).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, _REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError([
        f"train.deepspeed_config: {spec!r} not found (looked at "
        f"{', '.join(str(c) for c in candidates)}); give the path of a DeepSpeed JSON or a "
        f"built-in name: {', '.join(BUILTIN_DS_CONFIGS)}."])


def _owned_fields(cfg: PccConfig, stage: StageSettings, name: str, world_size: int,
                  per_rank: int | None) -> list[tuple[str, Any, str]]:
    """``(dotted DeepSpeed key, value from the TrainConfig, pcc_dist field that sets it)``."""
    dtype = cfg.model.dtype
    fields: list[tuple[str, Any, str]] = [
        ("train_batch_size", stage.global_batch_size, f"{name}.global_batch_size"),
        # One micro batch per optimizer step: 1 - r over k sub-batches is not 1 - r over their
        # union, so the loss is never split over accumulation steps (the gradient cache bounds
        # memory instead).
        ("gradient_accumulation_steps", 1,
         f"{name}.global_batch_size (pcc_dist never accumulates: each loss covers the whole "
         f"global batch; bound memory with {name}.gradcache_chunk_size)"),
        ("gradient_clipping", float(stage.grad_clip), f"{name}.grad_clip"),
        ("bf16.enabled", dtype == "bf16", f"model.dtype ({dtype!r})"),
        ("fp16.enabled", dtype == "fp16", f"model.dtype ({dtype!r})"),
    ]
    if per_rank is not None:
        fields.insert(1, ("train_micro_batch_size_per_gpu", per_rank,
                          f"{name}.global_batch_size / world size {world_size}"))
    return fields


def _per_rank_batch(stage: StageSettings, name: str, world_size: int,
                    problems: list[str]) -> int | None:
    """B = N / W, or None after recording a problem when W does not divide N."""
    n = stage.global_batch_size
    if world_size >= 1 and n % world_size == 0 and n >= world_size:
        return n // world_size
    lower = (n // world_size) * world_size
    options = " or ".join(str(v) for v in (lower, lower + world_size) if v > 0)
    problems.append(
        f"{name}.global_batch_size: {n} does not split evenly over world size {world_size} "
        f"(every rank must hold the same number of examples, for the cross-rank losses and "
        f"ZeRO's collectives); use a multiple of {world_size} ({options}).")
    return None


def _get_dotted(tree: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(json_value: Any, ours: Any) -> bool:
    if isinstance(ours, bool):
        return json_value is ours
    if isinstance(json_value, bool) or not isinstance(json_value, (int, float)):
        return False
    return math.isclose(float(json_value), float(ours), rel_tol=1e-12, abs_tol=0.0)


def _find_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for key, value in node.items():
            out += _find_autos(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix] if node == _AUTO else []


def resolve_ds_config(cfg: PccConfig, stage: StageSettings, world_size: int) -> dict[str, Any]:
    """Load the DeepSpeed JSON of ``cfg.train.deepspeed_config`` and fill its ``"auto"`` fields.

    Each rank holds B = N / W examples of the global batch N and there is no accumulation
    (A = 1): the loss of a step is one Pearson r / InfoNCE over all N examples, and splitting it
    over A micro steps would change the loss (1 - r over 4 batches of 64 is not 1 - r over 256).
    N must be a multiple of W (e.g. N = 256 on W = 3 is an error: 85.33 per rank).

    Args:
        cfg: The run config.
        stage: ``cfg.stage1`` or ``cfg.stage2``.
        world_size: Number of ranks W.

    Returns:
        The config dict to hand to ``deepspeed.initialize``.

    Raises:
        ConfigError: every problem at once: a file that is missing or not JSON; a batch size that
            does not split evenly over the ranks; a hard-coded owned value that conflicts
            with the TrainConfig (names file, key and both values); an ``optimizer`` or
            ``scheduler`` block; ``"auto"`` on a key pcc_dist does not fill; settings that
            disable the non-finite guard.
    """
    path = find_ds_config(cfg.train.deepspeed_config)
    name = _stage_name(cfg, stage)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"train.deepspeed_config: {path} is not valid JSON ({exc})."]) from exc
    if not isinstance(raw, dict):
        raise ConfigError([f"train.deepspeed_config: {path} must hold a JSON object, got "
                           f"{type(raw).__name__}."])
    ds = json.loads(json.dumps(raw))  # deep copy; the caller may keep `raw`
    if "bfloat16" in ds and "bf16" not in ds:  # DeepSpeed's older spelling of the same section
        ds["bf16"] = ds.pop("bfloat16")

    problems: list[str] = []
    for block, owner in (("optimizer", f"train.optimizer and {name}.lr / {name}.weight_decay"),
                         ("scheduler", f"{name}.warmup_steps / {name}.schedule")):
        if block in ds:
            problems.append(f"{path}: has a \"{block}\" block, but pcc_dist builds the {block} "
                            f"itself from {owner}; delete the block from the JSON.")
    for section in ("bf16", "fp16"):
        if section in ds and not isinstance(ds[section], dict):
            problems.append(f"{path}: \"{section}\" must be an object like "
                            f"{{\"enabled\": \"auto\"}}, got {ds[section]!r}.")
            ds.pop(section)

    per_rank = _per_rank_batch(stage, name, world_size, problems)
    owned = _owned_fields(cfg, stage, name, world_size, per_rank)
    owned_keys = {key for key, _, _ in owned} | {"train_micro_batch_size_per_gpu"}
    for key, ours, field in owned:
        present, value = _get_dotted(ds, key)
        if not present or value == _AUTO:
            _set_dotted(ds, key, ours)
        elif not _same(value, ours):
            problems.append(
                f"{path}: \"{key}\" is {json.dumps(value)} but the TrainConfig gives {ours!r} "
                f"(from {field}); write \"auto\" in the JSON so pcc_dist fills it, or change "
                f"{field.split(' ')[0]}.")
    for key in _find_autos(ds):
        if key not in owned_keys:
            problems.append(f"{path}: \"{key}\" is \"auto\", but pcc_dist fills only "
                            f"{', '.join(sorted(owned_keys))}; give a value or delete the key "
                            "to use DeepSpeed's default.")

    # The non-finite guard (TrainEngine.step) relies on DeepSpeed skipping any step whose global
    # gradient norm is inf/NaN, on every rank; these two settings turn that off.
    if ds.get("bf16", {}).get("enabled") and ds["bf16"].get("check_grad_overflow") is False:
        problems.append(f"{path}: \"bf16.check_grad_overflow\" is false, which lets a step with a "
                        "NaN/inf gradient update the weights; delete it (default true).")
    zero = ds.get("zero_optimization", {})
    if isinstance(zero, dict) and zero.get("compute_grad_norm") is False:
        problems.append(f"{path}: \"zero_optimization.compute_grad_norm\" is false, which "
                        "disables the NaN/inf step guard and grad-norm logging; delete it.")
    offload = isinstance(zero, dict) and any(
        isinstance(zero.get(k), dict) and zero[k].get("device") in ("cpu", "nvme")
        for k in ("offload_optimizer",))
    if offload and cfg.train.optimizer == "adamw_torch":
        # DeepSpeed refuses a torch optimizer with optimizer offload unless told otherwise; a
        # torch AdamW on CPU is slower than DeepSpeedCPUAdam but needs no compiled op.
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            problems.append(f"{path}: \"zero_force_ds_cpu_optimizer\" is true with "
                            "train.optimizer='adamw_torch'; set train.optimizer=adamw_deepspeed "
                            "or delete the key.")
        ds["zero_force_ds_cpu_optimizer"] = False
    if problems:
        raise ConfigError(problems, source=str(path))
    logger.debug("resolved DeepSpeed config from %s: %s", path, ds)
    return ds


