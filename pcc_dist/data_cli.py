"""``pcc-data``: inspect the data layer from the command line.

``pcc-data check [--data-root DIR] [--train SPEC] [--on-bad-row error|skip]
[--score-range LOW HIGH] [--json PATH]`` loads the STS7 test sets and a training set,
de-contaminates the training set against the tests and prints, per training source, how many pairs
it has, how many overlap a test set and how many are kept, then the overlaps per test task.

It reads, de-contaminates and scales scored pairs exactly as training does
(:func:`pcc_dist.data.load_training_set`, :func:`pcc_dist.data.decontaminate`,
:func:`pcc_dist.data.rescale_scores`), so what training would refuse (a bad row, a score outside
its source's range or ``--score-range``, a source whose scores are all equal) it refuses too,
naming the file and line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pcc_dist.config_checks import score_range_problem
from pcc_dist.data import (
    STS7_TASKS,
    ScoredPair,
    decontaminate,
    load_sts7,
    load_training_set,
    rescale_scores,
    reset_skipped_rows,
    resolve_data_root,
    skipped_rows,
)
from pcc_dist.errors import PccError
from pcc_dist.output_paths import output_file_problem

EXIT_DATA_ERROR = 1
EXIT_USAGE_ERROR = 2
_EXAMPLES_SHOWN = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcc-data", description="Inspect pcc_dist data sets.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check", help="load STS7 tests + a training set; report train/test overlap",
        description="Load the STS7 test sets and a training set, and report how many training "
                    "pairs occur in a test set (normalised text, either order).")
    check.add_argument("--data-root", default=None,
                       help="data folder (default: $PCC_DATA_DIR, then ../shared/data)")
    check.add_argument("--train", default="stage2",
                       help="'stage2', 'nli', a csv/tsv/jsonl file or a hub id (default: stage2)")
    check.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                       help="stop at the first bad training row, or skip and count bad rows")
    check.add_argument("--score-range", type=float, nargs=2, default=None,
                       metavar=("LOW", "HIGH"),
                       help="scale of the scores of sources without a known range, as "
                            "data.score_range (default: their observed min and max)")
    check.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="also write the report as JSON here")
    return parser


def _usage_problem(args: argparse.Namespace) -> str | None:
    """A mistake in the arguments, found before any file is read."""
    problem = score_range_problem(args.score_range, "--score-range")
    if problem is not None:
        return problem
    if args.json is not None:
        return output_file_problem(args.json, "--json")
    return None


def data_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pcc-data``; returns the process exit code.

    Returns:
        0 on success, 1 when the data cannot be loaded (the reason goes to stderr), 2 for a usage
        error.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return int(exc.code or 0)
    problem = _usage_problem(args)
    if problem is not None:
        print(f"pcc-data: {problem}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    score_range = tuple(args.score_range) if args.score_range else None
    try:
        result = _check(args.data_root, args.train, args.on_bad_row, score_range)
    except PccError as exc:
        print(f"pcc-data: {exc}", file=sys.stderr)
        return EXIT_DATA_ERROR
    _print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _check(data_root: str | None, train: str, on_bad_row: str,
           score_range: tuple[float, float] | None) -> dict:
    """Load everything as training does and build the JSON-ready result."""
    start = time.perf_counter()
    root = resolve_data_root(data_root)
    tests = load_sts7(root)
    reset_skipped_rows()
    items = load_training_set(train, root, on_bad_row=on_bad_row, score_range=score_range)
    kept, report = decontaminate(items, tests)
    if isinstance(items[0], ScoredPair):
        rescale_scores(kept, "per_source", score_range)  # raises what stage 2 would raise
    return {
        "data_root": str(root),
        "train": train,
        "kind": type(items[0]).__name__,
        "test_pairs": {name: len(task) for name, task in tests.items()},
        "decontamination": report.to_dict(),
        "skipped_rows": skipped_rows(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _print_report(result: dict) -> None:
    report = result["decontamination"]
    print(f"data root: {result['data_root']}")
    print("\nSTS7 test sets (pairs)")
    for name in STS7_TASKS:
        print(f"  {name:<16} {result['test_pairs'][name]:>6}")
    print(f"\ntraining set {result['train']!r} ({result['kind']}): overlap with STS7 test pairs "
          f"(normalised text, either order)")
    print(f"  {'source':<12} {'total':>7} {'removed':>8} {'kept':>7}")
    for source, total in report["total_per_source"].items():
        removed = report["removed_per_source"][source]
        print(f"  {source:<12} {total:>7} {removed:>8} {total - removed:>7}")
    print(f"  {'all':<12} {report['total']:>7} {report['removed']:>8} {report['kept']:>7}")
    print("\nremoved pairs per test task (a pair found in two tasks counts in both)")
    sources = list(report["total_per_source"])
    print(f"  {'task':<16}" + "".join(f" {s:>8}" for s in sources) + f" {'all':>8}")
    for name in STS7_TASKS:
        cells = "".join(f" {report['removed_per_source_task'][s][name]:>8}" for s in sources)
        print(f"  {name:<16}{cells} {report['removed_per_task'][name]:>8}")
    for example in report["examples"][:_EXAMPLES_SHOWN]:
        print(f"  e.g. [{example['source']} ~ {','.join(example['tasks'])}] "
              f"{example['sentence1']!r} / {example['sentence2']!r}")
    for path, count in result["skipped_rows"].items():
        print(f"skipped {count} bad row(s) in {path}")
    print(f"\n({result['seconds']:.2f} s)")
