"""The SentEval/SimCSE STS scoring protocol: cosines, Spearman, per-task records (DESIGN.md §3).

What every number :func:`pcc_dist.evaluation.evaluate_sts` reports means (the embedding loop is
there, the ``pcc-eval`` command in :mod:`pcc_dist.eval_cli`; this module scores embeddings):

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

"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pcc_dist.data import STS7_TASKS, StsTask

logger = logging.getLogger(__name__)

PROTOCOL = "senteval"
# STS12-16 are scored on the concatenation of their subsets ("all"); STS-B / SICK-R on their
# test split, the only subset they are loaded with. Both reduce to "Spearman over every pair of
# the loaded task", see the module docstring.
YEAR_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16")


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


def sts7_order(values: Mapping[str, Any]) -> dict[str, Any]:
    """STS7 order first (STS12 ... SICKRelatedness), any other task after, as given."""
    known = [t for t in STS7_TASKS if t in values]
    return {t: values[t] for t in known + [t for t in values if t not in STS7_TASKS]}


_SHORT = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def format_table(result: StsResult) -> str:
    """A plain-text table of the tasks + Avg., numbers x100 with 2 decimals.

    ``Avg.`` is the mean of the rounded scores, as SimCSE prints it (the exact mean is in the
    JSON).

    Args:
        result: Output of :func:`pcc_dist.evaluation.evaluate_sts`.

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
