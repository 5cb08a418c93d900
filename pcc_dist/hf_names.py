"""Hugging Face ``TrainingArguments`` names in a pcc_dist config.

Users of the HF Trainer write ``learning_rate``, ``num_train_epochs``, ``save_steps``... Where
the HF name means exactly what one of our keys means, it is an alias: the config is built as if
our key had been written (``stage2.learning_rate=1e-4`` is ``stage2.lr=1e-4``). Where the
meaning differs (``per_device_train_batch_size`` is per rank, our batch is global;
``warmup_ratio`` is a fraction, ours a step count; ``report_to`` takes a list), the name is an
unknown key whose message names our key and the difference, never a silent reinterpretation.

Aliases apply at the place the HF name belongs: a per-stage name inside ``stage1``/``stage2``
(at the top level it is ambiguous between the two stages and reported as such), the run-wide
ones (``seed``, ``output_dir``, ``deepspeed``, ``save_steps``...) at the top level or in their
own section.
"""

from __future__ import annotations

from typing import Any

STAGES = ("stage1", "stage2")

# HF name -> our key inside a stage section (same meaning: peak lr, epochs as a float, clipping
# norm with 0 = off).
_STAGE_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "max_grad_norm": "grad_clip",
}
# HF name -> our full dotted key (same meaning), accepted at the top level or in that key's
# own section.
_RUN_ALIASES = {
    "seed": "run.seed",
    "output_dir": "run.output_dir",
    "run_name": "run.name",
    "deepspeed": "train.deepspeed_config",
    "logging_steps": "train.log_every_steps",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume_from",
    "eval_steps": "eval.every_steps",
    "gradient_checkpointing": "model.gradient_checkpointing",
}
# HF names whose meaning differs from our nearest key: the hint names that key and why.
_DIFFERENT = {
    "per_device_train_batch_size": (
        "<stage>.global_batch_size",
        "ours is the global batch N over all ranks (per-device size x world size): the loss "
        "is computed on all N examples"),
    "gradient_accumulation_steps": (
        "<stage>.global_batch_size` and `<stage>.gradcache_chunk_size",
        "pcc_dist never accumulates (1 - r over sub-batches is not 1 - r over their union); "
        "the gradient cache bounds memory instead"),
    "warmup_ratio": ("<stage>.warmup_steps", "ours counts optimizer steps, not a fraction"),
    "lr_scheduler_type": (
        "<stage>.schedule",
        "ours is 'linear' | 'cosine' | 'constant', each after <stage>.warmup_steps of warmup"),
    "report_to": ("tracking.backend", "ours is one backend, 'mlflow' or 'none', not a list"),
    "per_device_eval_batch_size": ("eval.batch_size", "ours is the batch of the STS encoder"),
    "bf16": ("model.dtype", "write model.dtype=bf16"),
    "fp16": ("model.dtype", "write model.dtype=fp16"),
    "optim": ("train.optimizer", "ours is 'adamw_torch' | 'adamw_deepspeed'"),
    "eval_strategy": ("eval.every_steps", "0 = only at the end of each stage, N = every N steps"),
    "save_strategy": ("checkpoint.every_steps", "checkpoints are written every N steps"),
}


def _alias_target(section: str, key: str) -> str | None:
    """Our dotted key for HF name ``key`` written in ``section`` ("" = top level), or None."""
    if section in STAGES and key in _STAGE_ALIASES:
        return f"{section}.{_STAGE_ALIASES[key]}"
    target = _RUN_ALIASES.get(key)
    if target is not None and section in ("", target.split(".")[0]):
        return target
    return None


def canonical_key(dotted: str) -> str:
    """``stage2.learning_rate`` -> ``stage2.lr``; a key that is no alias comes back unchanged.

    Only the last part is translated, and only at the level it belongs to (``section.key`` or a
    top-level ``key``).
    """
    *parents, leaf = dotted.split(".")
    if len(parents) > 1:
        return dotted
    return _alias_target(parents[0] if parents else "", leaf) or dotted


def apply_aliases(tree: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Rename the HF aliases of one YAML tree to our keys (a new tree; ``tree`` is unchanged).

    An alias and its key both given (``stage2: {lr: 1, learning_rate: 2}``) is a problem, since
    one of them would be dropped.
    """
    if not isinstance(tree, dict):
        return tree
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    moves: list[tuple[str, str]] = [(k, canonical_key(k)) for k in tree]
    for section, body in tree.items():
        if isinstance(body, dict):
            moves += [(f"{section}.{k}", canonical_key(f"{section}.{k}")) for k in body]
    for source, target in moves:
        if source == target:
            continue
        value = _pop(out, source)
        tgt_section, tgt_key = target.split(".")
        node = out.setdefault(tgt_section, {})
        if not isinstance(node, dict):
            continue  # a malformed section: the tree builder reports it
        if tgt_key in node:
            problems.append(f"{source}: the Hugging Face name of `{target}`, which is also "
                            f"given; keep one of them.")
            continue
        node[tgt_key] = value
    return out


def _pop(tree: dict[str, Any], dotted: str) -> Any:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    return node.pop(leaf)


def hf_hint(section: str, key: str) -> str | None:
    """The message for an HF name that is no alias where it was written, or None.

    Args:
        section: Dotted path of the mapping the key was found in ("" = top level).
        key: The unknown key.
    """
    if key in _STAGE_ALIASES:
        ours = _STAGE_ALIASES[key]
        return (f"the Hugging Face name of our per-stage `{ours}`: write `stage1.{ours}` "
                f"and/or `stage2.{ours}`.")
    if key in _RUN_ALIASES:
        return f"the Hugging Face name of `{_RUN_ALIASES[key]}`: write that."
    if key in _DIFFERENT:
        ours, why = _DIFFERENT[key]
        stage = section if section in STAGES else "stage1|stage2"
        return (f"a Hugging Face name; the nearest pcc_dist key is "
                f"`{ours.replace('<stage>', stage)}`, but {why.replace('<stage>', stage)}.")
    return None
