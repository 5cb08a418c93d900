"""Keys and values of a DeepSpeed JSON that DeepSpeed would ignore or refuse, found up front.

DeepSpeed itself skips top-level keys it does not know without a word (a misspelt
``zero_optimisation`` trains with ZeRO stage 0) and refuses a bad value inside a section with a
pydantic traceback from ``deepspeed.initialize``, after the model has loaded. So
:func:`pcc_dist.ds_config.resolve_ds_config` checks every top-level key against
:data:`DEEPSPEED_KEYS` (:func:`unknown_keys`), the ZeRO stage against 0-3
(:func:`section_problems`), the ``zero_optimization``, ``bf16`` and ``fp16`` sections with
DeepSpeed's own pydantic models (:func:`deepspeed_problems`) and, last, the whole dict with
DeepSpeed's config parser (:func:`parser_problem`). Each problem is one line naming the file,
the key, the value and the fix (a did-you-mean for a misspelt key).
"""

from __future__ import annotations

import difflib
import importlib
import json
import typing
from pathlib import Path
from typing import Any

from pcc_dist.distributed import import_deepspeed

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
# against the PccConfig (the precision flags): their pydantic errors would repeat ours.
_OUR_CHECKS = frozenset({"zero_optimization.stage", "bf16.enabled", "fp16.enabled"})


def show_json(value: Any) -> str:
    """A JSON value as the user wrote it, cut to one short line."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(key: str, known: set[str] | frozenset[str], prefix: str = "") -> str:
    """The closest known key as a suggestion, else where DeepSpeed lists its keys."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean \"{prefix}{close[0]}\"?"
    return f"the keys DeepSpeed knows are listed at {_KEYS_DOC}."


def unknown_keys(ds: dict[str, Any], path: Path) -> list[str]:
    """Top-level keys DeepSpeed does not read, each with a did-you-mean."""
    return [f"{path}: unknown key \"{key}\"; {_did_you_mean(key, DEEPSPEED_KEYS)} DeepSpeed "
            "ignores keys it does not know, so this setting would have no effect: fix the "
            "spelling or delete the key."
            for key in ds if key not in DEEPSPEED_KEYS]


def section_problems(ds: dict[str, Any], path: Path) -> list[str]:
    """Sections that must be objects, and the ZeRO stage.

    A section that is not an object is removed from ``ds`` (after its problem is recorded), so
    the later checks see only well-formed sections.
    """
    problems = []
    for section, example in (("zero_optimization", '{"stage": 3}'),
                             ("bf16", '{"enabled": "auto"}'), ("fp16", '{"enabled": "auto"}')):
        if section in ds and not isinstance(ds[section], dict):
            problems.append(f"{path}: \"{section}\" must be an object like {example}, got "
                            f"{show_json(ds.pop(section))}.")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    # Integers only. DeepSpeed's own check takes JSON true as stage 1 (True == 1) and the string
    # "3" as stage 3, which the single-rank ZeRO-3 rewrite (pcc_dist.single_rank, stage == 3)
    # would miss.
    if type(stage) is not int or stage not in ZERO_STAGES:
        problems.append(f"{path}: \"zero_optimization.stage\" is {show_json(stage)}; allowed "
                        f"values: {', '.join(map(str, ZERO_STAGES))} (0 = no ZeRO, 1 = "
                        "optimizer states partitioned, 2 = also gradients, 3 = also "
                        "parameters).")
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
    return (f"{path}: \"{key}\" is {show_json(error['input'])}: {error['msg']} (DeepSpeed's "
            "check); fix the value or delete the key to use DeepSpeed's default.")


def deepspeed_problems(ds: dict[str, Any], path: Path) -> list[str]:
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


def parser_problem(ds: dict[str, Any], path: Path) -> list[str]:
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
