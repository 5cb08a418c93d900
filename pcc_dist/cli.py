"""Console entry points: ``pcc`` (subcommands) and ``pcc-train``, ``pcc-eval``, ``pcc-data``.

Each parses its arguments, turns configuration mistakes into a readable message with exit code 2,
and hands over to the module that does the work; an expected failure (:class:`PccError`) later
is printed without a traceback. ``pcc SUB ...`` runs the same functions as the ``pcc-*`` scripts
(``pcc train`` = ``pcc-train``, ``pcc sync-mlflow`` = ``pcc-train sync-mlflow``). Heavy imports
(DeepSpeed, transformers) happen only after the arguments are known to be valid.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings

from pcc_dist.config import ConfigError, PccConfig, load_config
from pcc_dist.config_docs import render_help
from pcc_dist.errors import PccError

EXIT_CONFIG_ERROR = 2


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcc-train",
        description="Pcc-tuning: stage 1 InfoNCE then stage 2 1 - Pearson r, on DeepSpeed.",
        epilog="Overrides: section.key=value, e.g. stage2.lr=1e-4 model.mode=lora.\n\n"
               + render_help(PccConfig()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (see launchers/configs/).")
    parser.add_argument("--validate", action="store_true",
                        help="check the config, the DeepSpeed JSON, the data, the model folder "
                             "and the output folder, print the resolved config and exit 0 (2 "
                             "and every problem found otherwise); starts no process group and "
                             "loads no weights.")
    # The HF Trainer's `--deepspeed ds.json` and DeepSpeed's own `--deepspeed_config ds.json`
    # (deepspeed.add_config_arguments): both are train.deepspeed_config.
    parser.add_argument("--deepspeed", "--deepspeed_config", "--deepspeed-config",
                        dest="deepspeed_config", metavar="PATH",
                        help="DeepSpeed JSON (or a built-in name: zero3, zero3_offload, zero2); "
                             "the same as train.deepspeed_config=PATH.")
    # The `deepspeed` launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def resolve_config(config_path: str | None, overrides: list[str],
                   deepspeed_config: str | None = None) -> PccConfig | None:
    """Load the config or print every problem to stderr and return None.

    ``deepspeed_config`` (``--deepspeed PATH``) becomes the override ``train.deepspeed_config``,
    applied before the ``key=value`` overrides; a problem with it names the flag.
    """
    flags: list[str] = []
    labels: dict[str, str] = {}
    if deepspeed_config is not None:
        flag = f"train.deepspeed_config={deepspeed_config}"
        flags.append(flag)
        labels[flag] = f"--deepspeed {deepspeed_config}"
    try:
        return load_config(config_path, [*flags, *overrides], labels=labels)
    except ConfigError as exc:
        print(f"pcc-train: {exc}", file=sys.stderr)
        return None


def validate(cfg: PccConfig, config_path: str | None) -> int:
    """``--validate``: run :func:`pcc_dist.preflight.preflight`; print the resolved config (stdout)
    and what was checked (stderr), or every problem found (stderr) with exit code 2."""
    from pcc_dist.preflight import preflight

    # DeepSpeed logs to stdout (its accelerator notice, deprecated keys); stdout is for the YAML.
    with contextlib.redirect_stdout(sys.stderr):
        report = preflight(cfg)
    if report.problems:
        print(f"pcc-train: {ConfigError(report.problems, source=config_path)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(cfg.to_yaml(), end="")
    for line in report.checked:
        print(f"# {line}", file=sys.stderr)
    print("# config OK", file=sys.stderr)
    return 0


def configure_logging() -> None:
    """Timestamped INFO logging for the launchers, without DeepSpeed's deprecation flood."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed 0.19.8 calls torch.distributed APIs that torch 2.13 deprecates
    # (all_gather_into_tensor, reduce_scatter_tensor), once per ZeRO-3 gather: thousands of
    # identical lines that would bury the training log.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.distributed\..* is deprecated")


def train_main(argv: list[str] | None = None) -> int:
    """``pcc-train --config FILE [--deepspeed JSON] [--validate] [key=value ...]``;
    ``pcc-train sync-mlflow DIR``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sync-mlflow"]:
        return sync_mlflow_main(argv[1:])
    args = _train_parser().parse_args(argv)
    cfg = resolve_config(args.config, args.overrides, args.deepspeed_config)
    if cfg is None:
        return EXIT_CONFIG_ERROR
    if args.validate:
        return validate(cfg, args.config)
    configure_logging()
    from pcc_dist.trainer import run_training

    try:
        run_training(cfg)
    except PccError as exc:
        # Expected failures carry a message that names the file, field or fix; a traceback
        # would only bury it.
        print(f"pcc-train: {exc}", file=sys.stderr)
        return 1
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``pcc-eval``: STS7 evaluation, see :mod:`pcc_dist.evaluation`."""
    from pcc_dist.eval_cli import eval_main as run

    return run(argv)


def data_main(argv: list[str] | None = None) -> int:
    """``pcc-data``: data checks such as train/test overlap, see :mod:`pcc_dist.data_cli`."""
    from pcc_dist.data_cli import data_main as run

    return run(argv)


def export_main(argv: list[str] | None = None) -> int:
    """``pcc-export``: write an adapter, merged or sentence-transformers folder, see
    :mod:`pcc_dist.export`."""
    from pcc_dist.export import export_main as run

    return run(argv)


def sync_mlflow_main(argv: list[str] | None = None) -> int:
    """``pcc-train sync-mlflow RUN_DIR``: upload a run's outage journal to MLflow."""
    from pcc_dist.tracking import sync_main

    return sync_main(argv)


# `pcc SUB ...`: each subcommand and the function the pcc-* script of the same job calls.
SUBCOMMANDS = {
    "train": (train_main, "training: stage 1 InfoNCE, then stage 2 Pcc (= pcc-train)"),
    "eval": (eval_main, "STS7 evaluation of a model or run folder (= pcc-eval)"),
    "data": (data_main, "data checks such as train/test overlap (= pcc-data)"),
    "export": (export_main, "adapter, merged or sentence-transformers export (= pcc-export)"),
    "sync-mlflow": (sync_mlflow_main,
                    "upload a run's MLflow outage journal (= pcc-train sync-mlflow)"),
}


def _pcc_usage() -> str:
    lines = ["usage: pcc {" + ",".join(SUBCOMMANDS) + "} ...", "",
             "Pcc-tuning of sentence embedders. `pcc SUB --help` shows a subcommand's options.",
             "", "subcommands:"]
    lines += [f"  {name:<12} {about}" for name, (_, about) in SUBCOMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``pcc SUB [ARGS ...]``: run subcommand ``SUB`` with ``ARGS``; exit code as its ``pcc-*``
    script's. An expected failure that the subcommand does not report itself is printed, exit 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_pcc_usage(), end="")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        got = f"unknown subcommand {argv[0]!r}" if argv else "no subcommand given"
        print(f"{_pcc_usage()}pcc: error: {got}; choose one of {', '.join(SUBCOMMANDS)}.",
              file=sys.stderr)
        return EXIT_CONFIG_ERROR
    run, _ = SUBCOMMANDS[argv[0]]
    try:
        return run(argv[1:])
    except PccError as exc:
        print(f"pcc {argv[0]}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
