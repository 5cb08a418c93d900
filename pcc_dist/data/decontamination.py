"""Train/test de-contamination against the STS7 test sets.

STS-B was assembled from the STS 2012-2016 tasks, so STS-B *train* shares pairs with the STS12-16
*test* sets; training on them inflates STS12-16 scores. Matching must survive two text forms:
the training file holds original cased text, the SentEval test files are Moses-tokenised and
lower-cased (``woman's`` vs ``woman ' s``).
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pcc_dist.data._core import ScoredPair, StsTask, Triplet

logger = logging.getLogger(__name__)

# Triplets carry no source name; they are reported under this one.
TRIPLET_SOURCE = "triplet"
UNLABELLED_SOURCE = "unlabelled"
MAX_EXAMPLES = 20


def normalise_text(text: str) -> str:
    """Canonical form of a sentence for overlap matching.

    NFKC, lower-case, then keep only alphanumeric characters. Whitespace is dropped too, not just
    collapsed: tokenisation inserts spaces inside words (``don't`` -> ``don 't``), so spaces are
    not reliable word boundaries. Raw STS-B and its SentEval copy agree exactly under this form
    (MANIFEST.md: 0 differences).

    Args:
        text: A sentence.

    Returns:
        The normalised string (may be empty for punctuation-only input).
    """
    lowered = unicodedata.normalize("NFKC", text).lower()
    return "".join(char for char in lowered if char.isalnum())


def pair_key(sentence1: str, sentence2: str) -> tuple[str, str]:
    """Order-independent key of a sentence pair: its two normalised sentences, sorted."""
    first, second = normalise_text(sentence1), normalise_text(sentence2)
    return (first, second) if first <= second else (second, first)


@dataclass
class DecontaminationReport:
    """What :func:`decontaminate` removed.

    Attributes:
        removed_per_source: Training items removed, per training source (every source present,
            zeros included).
        kept: Items kept.
        total: Items in.
        examples: Up to ``MAX_EXAMPLES`` removed items as dicts (source, sentences, tasks).
        total_per_source: Items in, per training source.
        removed_per_task: Removed items matching each test task; an item matching two tasks
            counts in both, so these may sum to more than the removed total.
        test_pairs: Test pairs per task that were checked against.
        removed_per_source_task: ``{source: {task: count}}``, the cross table of the two above.
    """

    removed_per_source: dict[str, int]
    kept: int
    total: int
    examples: list = field(default_factory=list)
    total_per_source: dict[str, int] = field(default_factory=dict)
    removed_per_task: dict[str, int] = field(default_factory=dict)
    test_pairs: dict[str, int] = field(default_factory=dict)
    removed_per_source_task: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        """Items removed in all."""
        return self.total - self.kept

    def to_dict(self) -> dict:
        """JSON-ready form (saved with the run)."""
        return {**asdict(self), "removed": self.removed}


def _item_pair(item: ScoredPair | Triplet) -> tuple[str, str, str]:
    """``(sentence, sentence, source)`` of a training item.

    Triplets are matched on (anchor, positive): that is the pair the loss pulls together, the
    analogue of a high-scoring STS pair. The hard negative is not checked.
    """
    if isinstance(item, Triplet):
        return item.anchor, item.positive, TRIPLET_SOURCE
    return item.sentence1, item.sentence2, item.source or UNLABELLED_SOURCE


def _test_index(test_tasks: dict[str, StsTask]) -> dict[tuple[str, str], set[str]]:
    """Normalised test pair key -> names of the tasks holding it (every subset of each task)."""
    index: dict[tuple[str, str], set[str]] = {}
    for name, task in test_tasks.items():
        for subset in task.subsets.values():
            for pair in subset:
                index.setdefault(pair_key(pair.sentence1, pair.sentence2), set()).add(name)
    return index


def decontaminate(pairs: Sequence[ScoredPair | Triplet], test_tasks: dict[str, StsTask]
                  ) -> tuple[list, DecontaminationReport]:
    """Drop training items whose sentence pair occurs in any of the given test sets.

    A match is the same two sentences after :func:`normalise_text`, in either order. Pass the
    *test* splits (``load_sts7()``); every subset of every task given is checked.

    Args:
        pairs: Scored pairs or triplets (matched on anchor and positive).
        test_tasks: Task name -> task.

    Returns:
        ``(kept items in their original order, report)``.
    """
    index = _test_index(test_tasks)
    kept = []
    total_per_source: Counter[str] = Counter()
    removed_per_source: Counter[str] = Counter()
    removed_per_task: Counter[str] = Counter({name: 0 for name in test_tasks})
    cross: dict[str, Counter[str]] = {}
    examples = []
    for item in pairs:
        first, second, source = _item_pair(item)
        total_per_source[source] += 1
        tasks = index.get(pair_key(first, second))
        if not tasks:
            kept.append(item)
            continue
        removed_per_source[source] += 1
        removed_per_task.update(tasks)
        cross.setdefault(source, Counter()).update(tasks)
        if len(examples) < MAX_EXAMPLES:
            examples.append({"source": source, "sentence1": first, "sentence2": second,
                             "tasks": sorted(tasks)})
    report = DecontaminationReport(
        removed_per_source={source: removed_per_source[source] for source in total_per_source},
        kept=len(kept), total=len(pairs), examples=examples,
        total_per_source=dict(total_per_source), removed_per_task=dict(removed_per_task),
        test_pairs={name: len(task) for name, task in test_tasks.items()},
        removed_per_source_task={source: {name: cross.get(source, Counter())[name]
                                          for name in test_tasks}
                                 for source in total_per_source})
    logger.info("de-contamination: removed %d of %d training items that occur in the test sets "
                "(per source %s; per test task %s)", report.removed, report.total,
                report.removed_per_source, report.removed_per_task)
    return kept, report
