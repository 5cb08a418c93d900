"""STS evaluation of an embedder: embed every unique sentence once, then score under the
SentEval/SimCSE protocol of :mod:`pcc_dist.sts_protocol` (what each number means is there).

:func:`evaluate_sts` is the entry point (the trainer's dev evaluations, ``pcc-eval``, the Python
API); the ``pcc-eval`` command itself is :mod:`pcc_dist.eval_cli`.

Example:
    >>> from pcc_dist.data import load_sts7
    >>> result = evaluate_sts(embedder, load_sts7())        # doctest: +SKIP
    >>> print(format_table(result))                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pcc_dist.data import STS7_TASKS, StsTask
from pcc_dist.progress import progress
from pcc_dist.sts_protocol import (
    YEAR_TASKS,
    StsResult,
    cosine_scores,
    limit_warning,
    score_task,
    senteval_text,
    sts7_order,
)

logger = logging.getLogger(__name__)

# "No truncation" for encoders that do not report a position limit.
_NO_LIMIT = 1_000_000

EmbedFn = Callable[[list[str]], torch.Tensor]


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

    ordered = sts7_order(spearman)
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
    return StsResult(spearman=ordered, avg=avg, n_pairs=sts7_order(n_pairs), seconds=seconds,
                     details=details, limit=limit)
