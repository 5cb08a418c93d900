"""The DeepSpeed JSON of a run: find it, check it, fill the fields the PccConfig owns.

:func:`resolve_ds_config` reads a DeepSpeed JSON (a path or a built-in name ``zero3``,
``zero3_offload``, ``zero2``) and fills every field the PccConfig owns. The JSON writes them as
``"auto"``; a hard-coded value that disagrees with the PccConfig, an ``optimizer`` or
``scheduler`` block, or an ``"auto"`` on a field we do not own is a :class:`ConfigError`. The
training engine (:func:`pcc_dist.engine.build_engine`) and ``pcc-train --validate`` both call it.

The resolver also runs the checks of :mod:`pcc_dist.ds_checks` (keys and values DeepSpeed would
ignore or refuse) and, for a stock Hugging Face Trainer JSON, :mod:`pcc_dist.ds_hf_auto`; every
problem is collected and raised at once.

Fields owned by the PccConfig (DeepSpeed key <- pcc_dist field):

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
from pcc_dist.ds_checks import (
    deepspeed_problems,
    parser_problem,
    section_problems,
    show_json,
    unknown_keys,
)
from pcc_dist.ds_hf_auto import drop_auto_blocks, fill_hidden_size_autos

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


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


class _RepeatedKey(ValueError):
    """A key given twice in one JSON object."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a repeated key: ``json`` would keep the last value and
    drop the first silently (two pasted ``zero_optimization`` blocks lose one of them)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8 JSON (line and column named), repeats
            a key, or holds something other than an object.
    """
    where = f"train.deepspeed_config: {path}"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except OSError as exc:
        raise ConfigError([f"{where} cannot be read ({exc.strerror or exc})."]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where} is not valid JSON: not UTF-8 text (byte {exc.start})."]
                          ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                           f"{exc.colno}; fix it there (a trailing comma or a comment are the "
                           "usual causes: JSON allows neither)."]) from exc
    except _RepeatedKey as exc:
        raise ConfigError([f"{where}: key \"{exc.key}\" appears twice in one object; JSON keeps "
                           "only the last, so the first would be ignored: merge the two."]
                          ) from exc
    except (ValueError, RecursionError) as exc:
        # JSON the decoder still refuses: an integer of more than 4,300 digits (ValueError) or
        # nesting deeper than the recursion limit.
        reason = "nesting too deep" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError([f"{where} cannot be loaded ({reason})."]) from exc
    if not isinstance(raw, dict):
        raise ConfigError([f"{where} must hold a JSON object, got {type(raw).__name__}."])
    return raw


# --------------------------------------------------------------------------------------------
# Fields the PccConfig owns
# --------------------------------------------------------------------------------------------


def _owned_fields(cfg: PccConfig, stage: StageSettings, name: str, world_size: int,
                  per_rank: int | None) -> list[tuple[str, Any, str]]:
    """``(dotted DeepSpeed key, value from the PccConfig, pcc_dist field that sets it)``."""
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
    try:
        return math.isclose(float(json_value), float(ours), rel_tol=1e-12, abs_tol=0.0)
    except OverflowError:  # an integer beyond float range (10**400) equals none of ours
        return False


def _find_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for key, value in node.items():
            out += _find_autos(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix] if node == _AUTO else []


def _fill_owned(ds: dict[str, Any], path: Path, cfg: PccConfig, stage: StageSettings,
                name: str, world_size: int) -> list[str]:
    """Write the PccConfig's value into every owned field the JSON leaves out or sets to
    ``"auto"``; a hard-coded value that disagrees, or ``"auto"`` on a field we do not own, is a
    problem."""
    problems: list[str] = []
    per_rank = _per_rank_batch(stage, name, world_size, problems)
    owned = _owned_fields(cfg, stage, name, world_size, per_rank)
    owned_keys = {key for key, _, _ in owned} | {"train_micro_batch_size_per_gpu"}
    for key, ours, field in owned:
        present, value = _get_dotted(ds, key)
        if not present or value == _AUTO:
            _set_dotted(ds, key, ours)
        elif not _same(value, ours):
            problems.append(
                f"{path}: \"{key}\" is {show_json(value)} but the PccConfig gives {ours!r} "
                f"(from {field}); write \"auto\" in the JSON so pcc_dist fills it, or change "
                f"{field.split(' ')[0]}.")
    for key in _find_autos(ds):
        if key not in owned_keys:
            problems.append(f"{path}: \"{key}\" is \"auto\", but pcc_dist fills only "
                            f"{', '.join(sorted(owned_keys))}; give a value or delete the key "
                            "to use DeepSpeed's default.")
    return problems


def _refused_blocks(ds: dict[str, Any], path: Path, name: str) -> list[str]:
    """``optimizer`` / ``scheduler`` blocks: pcc_dist builds both from the PccConfig."""
    owners = {"optimizer": f"train.optimizer and {name}.lr / {name}.weight_decay",
              "scheduler": f"{name}.warmup_steps / {name}.schedule"}
    return [f"{path}: has a \"{block}\" block, but pcc_dist builds the {block} itself from "
            f"{owner}; delete the block from the JSON." for block, owner in owners.items()
            if block in ds]


def _guard_problems(ds: dict[str, Any], path: Path, cfg: PccConfig) -> list[str]:
    """Settings that would defeat the non-finite step guard or the torch optimizer."""
    problems = []
    # The non-finite guard (TrainEngine.step) relies on DeepSpeed skipping any step whose global
    # gradient norm is inf/NaN, on every rank; these two settings turn that off.
    if ds.get("bf16", {}).get("enabled") and ds["bf16"].get("check_grad_overflow") is False:
        problems.append(f"{path}: \"bf16.check_grad_overflow\" is false, which lets a step with a "
                        "NaN/inf gradient update the weights; delete it (default true).")
    zero = ds.get("zero_optimization", {})
    if zero.get("compute_grad_norm") is False:
        problems.append(f"{path}: \"zero_optimization.compute_grad_norm\" is false, which "
                        "disables the NaN/inf step guard and grad-norm logging; delete it.")
    offload = zero.get("offload_optimizer")
    if isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme") \
            and cfg.train.optimizer == "adamw_torch":
        # DeepSpeed refuses a torch optimizer with optimizer offload unless told otherwise; a
        # torch AdamW on CPU is slower than DeepSpeedCPUAdam but needs no compiled op.
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            problems.append(f"{path}: \"zero_force_ds_cpu_optimizer\" is true with "
                            "train.optimizer='adamw_torch'; set train.optimizer=adamw_deepspeed "
                            "or delete the key.")
        ds["zero_force_ds_cpu_optimizer"] = False
    return problems


def _fp32_grad_accumulation(ds: dict[str, Any], path: Path) -> list[str]:
    """Under bf16 with ZeRO-2/3, accumulate gradient partitions in fp32.

    Without ``data_types.grad_accum_dtype`` DeepSpeed keeps them in the model dtype, so the
    gradient cache's k = ceil(B / C) backward calls per step are summed in bf16 (8 significant
    bits: each addition rounds at a relative 2**-9 = 0.2 %), before the fp32 master step. With
    "fp32" only each backward's own gradient is bf16; the sum over the k calls, the reduce over
    the ranks and the optimizer step are fp32. Stage 0 and 1 are left alone: DeepSpeed refuses
    the mix at stage 0 and switches stage 1 to another optimizer class (BF16_Optimizer), whose
    checkpoints the portable-state code does not read. A value the JSON sets is kept.
    """
    zero_stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not ds.get("bf16", {}).get("enabled") or zero_stage not in (2, 3):
        return []
    types = ds.setdefault("data_types", {})
    if not isinstance(types, dict):
        return [f"{path}: \"data_types\" must be an object, e.g. "
                '{"grad_accum_dtype": "fp32"}; got ' f"{show_json(types)}."]
    types.setdefault("grad_accum_dtype", "fp32")
    return []


def resolve_ds_config(cfg: PccConfig, stage: StageSettings, world_size: int) -> dict[str, Any]:
    """Load the DeepSpeed JSON of ``cfg.train.deepspeed_config``, check it, fill its ``"auto"``s.

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
        ConfigError: every problem at once: a file that is missing, unreadable or not JSON
            (line and column named); a key DeepSpeed does not know (with a did-you-mean); a ZeRO
            stage outside 0-3; a value DeepSpeed's own models of ``zero_optimization``,
            ``bf16`` or ``fp16`` refuse; a batch size that does not split evenly over the
            ranks; a hard-coded owned value that conflicts with the PccConfig (names file, key
            and both values); an ``optimizer`` or ``scheduler`` block; ``"auto"`` on a key
            pcc_dist does not fill; settings that disable the non-finite guard; anything else
            DeepSpeed's own parser refuses.
    """
    path = find_ds_config(cfg.train.deepspeed_config)
    name = _stage_name(cfg, stage)
    ds = _read_json(path)
    problems = unknown_keys(ds, path)
    if "bfloat16" in ds:  # DeepSpeed's older spelling of the same section
        if "bf16" in ds:
            problems.append(f"{path}: has both \"bf16\" and its older spelling \"bfloat16\"; "
                            "DeepSpeed reads only \"bf16\": delete \"bfloat16\".")
        else:
            ds["bf16"] = ds.pop("bfloat16")
    # A stock HF Trainer JSON: its all-"auto" optimizer/scheduler blocks and hidden-size sizes.
    drop_auto_blocks(ds, path)
    problems += fill_hidden_size_autos(ds, path, cfg)
    problems += section_problems(ds, path)
    problems += _refused_blocks(ds, path, name)
    problems += _fill_owned(ds, path, cfg, stage, name, world_size)
    problems += deepspeed_problems(ds, path)
    problems += _guard_problems(ds, path, cfg)
    problems += _fp32_grad_accumulation(ds, path)
    if not problems:
        problems = parser_problem(ds, path)
    if problems:
        raise ConfigError(problems, source=str(path))
    logger.debug("resolved DeepSpeed config from %s: %s", path, ds)
    return ds
