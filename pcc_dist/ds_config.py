"""The DeepSpeed JSON of a run: find it, check it, fill the fields the TrainConfig owns.

:func:`resolve_ds_config` reads a DeepSpeed JSON (a path or a built-in name ``zero3``,
``zero3_offload``, ``zero2``) and fills every field the TrainConfig owns. The JSON writes them as
``"auto"``; a hard-coded value that disagrees with the TrainConfig, an ``optimizer`` or
``scheduler`` block, or an ``"auto"`` on a field we do not own is a :class:`ConfigError`. The
training engine (:func:`pcc_dist.engine.build_engine`) and ``pcc-train --validate`` both call it.

DeepSpeed itself skips top-level keys it does not know without a word (a misspelt
``zero_optimisation`` trains with ZeRO stage 0) and refuses a bad value inside a section with a
pydantic traceback from ``deepspeed.initialize``, after the model has loaded. So the resolver
also checks every top-level key against :data:`DEEPSPEED_KEYS`, the ZeRO stage against 0-3, and
the ``zero_optimization``, ``bf16`` and ``fp16`` sections with DeepSpeed's own pydantic models;
each problem names the file, the key, the value and the fix (a did-you-mean for a misspelt key).

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

import difflib
import importlib
import json
import logging
import math
import sys
import typing
from pathlib import Path
from typing import Any

from pcc_dist.config import ConfigError, PccConfig, StageSettings
from pcc_dist.distributed import import_deepspeed
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
# The top-level keys DeepSpeed 0.19 reads from its JSON (DeepSpeedConfig and the section readers
# it calls; tests/unit/test_ds_config.py checks them against the installed DeepSpeed), less the
# ones 0.19 has removed and refuses (amp, sparse_attention, elasticity, ...). Any other key is
# ignored by DeepSpeed, so a misspelt one would silently change nothing.
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "csv_monitor", "data_efficiency",
    "data_parallel_size", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "expert_parallel", "flops_profiler",
    "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
    "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size",
    "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})
ZERO_STAGES = (0, 1, 2, 3)
# Sections DeepSpeed validates with pydantic models of its own: (module, class) in DeepSpeed.
_SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
}
_KEYS_DOC = "https://www.deepspeed.ai/docs/config-json/"
# Section keys pcc_dist checks itself, more strictly than DeepSpeed's models (the stage) or
# against the TrainConfig (the precision flags): their pydantic errors would repeat ours.
_OUR_CHECKS = frozenset({"zero_optimization.stage", "bf16.enabled", "fp16.enabled"})


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
# Keys and values DeepSpeed would ignore or refuse
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A JSON value as the user wrote it, cut to one short line."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(key: str, known: set[str] | frozenset[str], prefix: str = "") -> str:
    """The closest known key as a suggestion, else where DeepSpeed lists its keys."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean \"{prefix}{close[0]}\"?"
    return f"the keys DeepSpeed knows are listed at {_KEYS_DOC}."


def _unknown_keys(ds: dict[str, Any], path: Path) -> list[str]:
    """Top-level keys DeepSpeed does not read, each with a did-you-mean."""
    return [f"{path}: unknown key \"{key}\"; {_did_you_mean(key, DEEPSPEED_KEYS)} DeepSpeed "
            "ignores keys it does not know, so this setting would have no effect: fix the "
            "spelling or delete the key."
            for key in ds if key not in DEEPSPEED_KEYS]


def _section_problems(ds: dict[str, Any], path: Path) -> list[str]:
    """Sections that must be objects, and the ZeRO stage.

    A section that is not an object is removed from ``ds`` (after its problem is recorded), so
    the later checks see only well-formed sections.
    """
    problems = []
    for section, example in (("zero_optimization", '{"stage": 3}'),
                             ("bf16", '{"enabled": "auto"}'), ("fp16", '{"enabled": "auto"}')):
        if section in ds and not isinstance(ds[section], dict):
            problems.append(f"{path}: \"{section}\" must be an object like {example}, got "
                            f"{_show(ds.pop(section))}.")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    # Integers only. DeepSpeed's own check takes JSON true as stage 1 (True == 1) and the string
    # "3" as stage 3, which pcc_dist.engine's single-rank ZeRO-3 shortcut (stage == 3) would miss.
    if type(stage) is not int or stage not in ZERO_STAGES:
        problems.append(f"{path}: \"zero_optimization.stage\" is {_show(stage)}; allowed values: "
                        f"{', '.join(map(str, ZERO_STAGES))} (0 = no ZeRO, 1 = optimizer states "
                        "partitioned, 2 = also gradients, 3 = also parameters).")
    return problems


def _deepspeed_model(section: str) -> Any:
    """DeepSpeed's pydantic model of ``section``, or None where this DeepSpeed has none."""
    module, name = _SECTION_MODELS[section]
    import_deepspeed()  # a missing DeepSpeed is an install problem, not a skipped check
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _model_fields(model: Any) -> set[str]:
    """The keys a pydantic model accepts: field names and their aliases."""
    return {key for name, field in model.model_fields.items() for key in (name, field.alias)
            if key}


def _nested_model(model: Any, loc: list[str]) -> Any:
    """The pydantic model at ``loc`` inside ``model`` (e.g. ``offload_param``), or None."""
    for part in loc:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return None
        candidates = typing.get_args(field.annotation) or (field.annotation,)
        model = next((c for c in candidates if hasattr(c, "model_fields")), None)
        if model is None:
            return None
    return model


def _unknown_section_key(path: Path, dotted: str, known: set[str]) -> str:
    """The line for a key that DeepSpeed's model of its section does not have."""
    parent, _, leaf = dotted.rpartition(".")
    return (f"{path}: unknown key \"{dotted}\"; {_did_you_mean(leaf, known, parent + '.')} "
            f"DeepSpeed refuses unknown keys in \"{dotted.split('.')[0]}\": fix the spelling or "
            "delete the key.")


def _pydantic_problem(path: Path, section: str, model: Any, error: dict[str, Any]) -> str:
    """One line for one error of DeepSpeed's pydantic validation, in DeepSpeed's own words."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join([section, *loc])
    parent = _nested_model(model, loc[:-1])
    if error["type"] == "extra_forbidden" and parent is not None:
        return _unknown_section_key(path, key, _model_fields(parent))
    if not loc:
        return f"{path}: \"{section}\" is refused by DeepSpeed: {error['msg']}."
    return (f"{path}: \"{key}\" is {_show(error['input'])}: {error['msg']} (DeepSpeed's check); "
            "fix the value or delete the key to use DeepSpeed's default.")


def _deepspeed_problems(ds: dict[str, Any], path: Path) -> list[str]:
    """DeepSpeed's own verdict on the sections it checks with pydantic, before anything starts:
    ``deepspeed.initialize`` would raise the same errors as a traceback, after the model loaded.
    """
    from pydantic import ValidationError

    problems = []
    for section in _SECTION_MODELS:
        value = ds.get(section)
        model = _deepspeed_model(section) if isinstance(value, dict) else None
        if model is None:
            continue
        known = _model_fields(model)
        problems += [_unknown_section_key(path, f"{section}.{key}", known)
                     for key in value if key not in known]
        try:
            # Known keys only, passed the way DeepSpeed passes them (keyword arguments): an
            # unknown key named like a parameter of the model's __init__ ("strict", "self")
            # would otherwise be taken for that parameter.
            model(**{key: item for key, item in value.items() if key in known})
        except ValidationError as exc:
            problems += [_pydantic_problem(path, section, model, error) for error in exc.errors()
                         if ".".join([section, *map(str, error["loc"][:1])]) not in _OUR_CHECKS]
    return problems


# --------------------------------------------------------------------------------------------
# Fields the TrainConfig owns
# --------------------------------------------------------------------------------------------


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
    """Write the TrainConfig's value into every owned field the JSON leaves out or sets to
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
                f"{path}: \"{key}\" is {_show(value)} but the TrainConfig gives {ours!r} "
                f"(from {field}); write \"auto\" in the JSON so pcc_dist fills it, or change "
                f"{field.split(' ')[0]}.")
    for key in _find_autos(ds):
        if key not in owned_keys:
            problems.append(f"{path}: \"{key}\" is \"auto\", but pcc_dist fills only "
                            f"{', '.join(sorted(owned_keys))}; give a value or delete the key "
                            "to use DeepSpeed's default.")
    return problems


def _refused_blocks(ds: dict[str, Any], path: Path, name: str) -> list[str]:
    """``optimizer`` / ``scheduler`` blocks: pcc_dist builds both from the TrainConfig."""
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
                '{"grad_accum_dtype": "fp32"}; got ' f"{_show(types)}."]
    types.setdefault("grad_accum_dtype", "fp32")
    return []


def _parser_problem(ds: dict[str, Any], path: Path) -> list[str]:
    """DeepSpeed's whole config parser (what ``deepspeed.initialize`` runs) on the resolved dict,
    for values in sections no pydantic model covers (e.g. ``"wall_clock_breakdown": null`` is a
    TypeError deep inside DeepSpeed). ``train_batch_size`` is left out of the probe: DeepSpeed
    derives it from the other two for whatever world size it sees, and its split over the ranks
    is checked above."""
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {key: value for key, value in ds.items() if key != "train_batch_size"}
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many kinds; each is a refusal
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return [f"{path}: DeepSpeed's own parser refuses this config ({reason}); fix the key it "
                "names, or delete it to use DeepSpeed's default."]
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
            ranks; a hard-coded owned value that conflicts with the TrainConfig (names file, key
            and both values); an ``optimizer`` or ``scheduler`` block; ``"auto"`` on a key
            pcc_dist does not fill; settings that disable the non-finite guard; anything else
            DeepSpeed's own parser refuses.
    """
    path = find_ds_config(cfg.train.deepspeed_config)
    name = _stage_name(cfg, stage)
    ds = _read_json(path)
    problems = _unknown_keys(ds, path)
    if "bfloat16" in ds:  # DeepSpeed's older spelling of the same section
        if "bf16" in ds:
            problems.append(f"{path}: has both \"bf16\" and its older spelling \"bfloat16\"; "
                            "DeepSpeed reads only \"bf16\": delete \"bfloat16\".")
        else:
            ds["bf16"] = ds.pop("bfloat16")
    # A stock HF Trainer JSON: its all-"auto" optimizer/scheduler blocks and hidden-size sizes.
    drop_auto_blocks(ds, path)
    problems += fill_hidden_size_autos(ds, path, cfg)
    problems += _section_problems(ds, path)
    problems += _refused_blocks(ds, path, name)
    problems += _fill_owned(ds, path, cfg, stage, name, world_size)
    problems += _deepspeed_problems(ds, path)
    problems += _guard_problems(ds, path, cfg)
    problems += _fp32_grad_accumulation(ds, path)
    if not problems:
        problems = _parser_problem(ds, path)
    if problems:
        raise ConfigError(problems, source=str(path))
    logger.debug("resolved DeepSpeed config from %s: %s", path, ds)
    return ds
