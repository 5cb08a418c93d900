"""``pcc-train --validate``: everything a run needs that can be checked without weights or ranks.

:func:`preflight` runs the checks of the real run, with the real run's code, on a resolved
config, and stops before anything is loaded into memory or a process group starts:

* the DeepSpeed JSON of every enabled stage (:func:`pcc_dist.ds_config.resolve_ds_config`: the
  file exists and parses, its keys are ones DeepSpeed knows, its values pass DeepSpeed's own
  checks and agree with the PccConfig) for ``$WORLD_SIZE`` ranks (1 when unset);
* the data: the data root, every row of each enabled stage's training set read by the trainer's
  own reader (a ``datasets`` hub id is left to the run, which needs the internet for it), and the
  STS7 sets used for de-contamination and evaluation;
* the model (:func:`pcc_dist.modeling.plan_model`): the folder, alias or run folder exists, its
  ``config.json`` is readable, and the pooling and template options fit the model's kind;
* the output folder can be written, without creating it.

Every problem is collected, so one run of ``--validate`` lists them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pcc_dist.config import ConfigError, PccConfig

STAGES = ("stage1", "stage2")


@dataclass
class PreflightReport:
    """What :func:`preflight` found.

    Attributes:
        problems: One line per problem, each naming the file, key or value and the fix.
        checked: One line per thing found fine (printed by ``--validate``).
    """

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def world_size_from_env(report: PreflightReport) -> int:
    """The world size the run will have: ``$WORLD_SIZE`` (set by torchrun and the DeepSpeed
    launcher), else 1."""
    text = os.environ.get("WORLD_SIZE", "1")
    if text.isdigit() and int(text) >= 1:
        return int(text)
    report.problems.append(f"WORLD_SIZE={text!r} in the environment is not a positive integer; "
                           "unset it or set the number of ranks the run will have.")
    return 1


def _enabled(cfg: PccConfig) -> list[str]:
    return [name for name in STAGES if getattr(cfg, name).enabled]


def check_deepspeed(cfg: PccConfig, world_size: int, report: PreflightReport) -> None:
    """The DeepSpeed JSON, resolved for each enabled stage as the engine will resolve it."""
    from pcc_dist.ds_config import find_ds_config, resolve_ds_config

    for name in _enabled(cfg):
        try:
            ds = resolve_ds_config(cfg, getattr(cfg, name), world_size)
        except ConfigError as exc:
            # Both stages read the same file: a problem in it is listed once.
            report.problems += [p for p in exc.problems if p not in report.problems]
        except ImportError as exc:
            report.problems.append(str(exc))
            return
        else:
            report.checked.append(
                f"train.deepspeed_config: {find_ds_config(cfg.train.deepspeed_config)} (ZeRO "
                f"stage {ds.get('zero_optimization', {}).get('stage', 0)}) fits {name} on "
                f"{world_size} rank(s)")


def check_data(cfg: PccConfig, report: PreflightReport) -> None:
    """The data root, the training set of each enabled stage and the STS sets the run reads."""
    from pcc_dist.data import DataError, is_hub_id, load_sts7, load_sts_task, resolve_data_root
    from pcc_dist.data.sources import BUILTIN_TRAINING_SETS
    from pcc_dist.stage_data import TrainingError, read_stage_examples

    try:
        root = resolve_data_root(cfg.data.root)
    except DataError as exc:
        report.problems.append(str(exc))
        return
    for name in _enabled(cfg):
        spec = getattr(cfg, name).data
        if spec not in BUILTIN_TRAINING_SETS and is_hub_id(spec):
            report.checked.append(f"{name}.data={spec!r}: a datasets hub id, not checked "
                                  "offline (the run needs the internet to read it)")
            continue
        try:
            examples = read_stage_examples(cfg, name, root)
        except DataError as exc:
            report.problems.append(f"{name}.data={spec!r}: {exc}")
        except TrainingError as exc:  # its message names the setting already
            report.problems.append(str(exc))
        else:
            report.checked.append(f"{name}.data={spec!r}: {len(examples)} examples read")
    uses = [use for use, on in (("de-contamination", cfg.data.decontaminate),
                                ("eval.tasks", bool(cfg.eval.tasks))) if on]
    if uses:
        _check_sts(report, f"the STS7 test sets ({', '.join(uses)})", load_sts7, root)
    if cfg.eval.dev:
        _check_sts(report, "the STS-B dev set (eval.dev)", load_sts_task, "STSBenchmark", root,
                   split="dev")


def _check_sts(report: PreflightReport, what: str, load: Callable[..., object], *args: object,
               **kwargs: object) -> None:
    """Read STS sets with the run's own loader; a DataError becomes a problem line."""
    from pcc_dist.data import DataError

    try:
        load(*args, **kwargs)
    except DataError as exc:
        report.problems.append(f"{what}: {exc}")
    else:
        report.checked.append(f"{what}: read")


def check_model(cfg: PccConfig, report: PreflightReport) -> object:
    """The model source, its ``config.json`` and the options that must fit its kind; returns the
    Hugging Face config read (None when there is none), for the free-space estimate."""
    from pcc_dist.modeling import ModelError, plan_model

    try:
        plan = plan_model(cfg.model)
    except ModelError as exc:
        report.problems += exc.problems
        return None
    what = "a trained run folder, whose own settings apply" if plan.run_meta is not None else (
        f"{getattr(plan.hf_config, 'model_type', None)!r} {plan.kind}")
    report.checked.append(f"model.name_or_path={cfg.model.name_or_path!r}: {plan.source} "
                          f"({what}; pooling {plan.pooling}, read from {plan.origin})")
    return plan.hf_config


def check_output(cfg: PccConfig, report: PreflightReport, hf_config: object = None) -> None:
    """The run folder can be written (probed without creating it) and has room for the
    checkpoints (:func:`pcc_dist.memory_plan.checkpoint_space_needed`)."""
    from pcc_dist.checkpoint import CheckpointError, preflight_output_dir
    from pcc_dist.memory_plan import checkpoint_space_needed

    folder = Path(cfg.run.output_dir)
    needed, why = checkpoint_space_needed(cfg, hf_config)
    try:
        preflight_output_dir(folder, needed, create=False)
    except CheckpointError as exc:
        report.problems.append(f"run.output_dir={cfg.run.output_dir!r}: {exc} ({why})")
    else:
        report.checked.append(f"run.output_dir={cfg.run.output_dir!r}: writable, "
                              f"{needed / 2**30:.2f} GiB free needed ({why})")


def preflight(cfg: PccConfig) -> PreflightReport:
    """Run every check of :mod:`pcc_dist.preflight` on ``cfg``.

    Args:
        cfg: A config that passed :func:`pcc_dist.config.load_config`.

    Returns:
        The problems found (none: the run can start) and what was checked.
    """
    report = PreflightReport()
    world_size = world_size_from_env(report)
    check_deepspeed(cfg, world_size, report)
    check_data(cfg, report)
    hf_config = check_model(cfg, report)
    check_output(cfg, report, hf_config)
    return report
