"""A step's token views, tokenised ahead of the step in a background thread.

Tokenising a step's sentences (templates, truncation inside the template, collation) takes CPU
time the accelerator would otherwise wait for. :class:`Prefetcher` runs ``produce(step)`` for the
next steps in one daemon thread while the current step trains, ``depth`` steps ahead at most. The
items only depend on the step number (the global-batch plan is a pure function of the seed, see
:mod:`pcc_dist.sampling`), so a resumed run gets exactly the batches the uninterrupted run got.

Failures and shutdown: an exception in ``produce`` is handed to the main thread and re-raised by
:meth:`Prefetcher.get` for that step (the same exception object: its type and message, with the
worker's traceback); the worker then stops. Leaving the ``with`` block for any reason (an error
in the step, KeyboardInterrupt) stops the worker and joins it; a worker blocked on a full queue
sees the stop within :data:`_POLL_S`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

_POLL_S = 0.1
_JOIN_S = 30.0  # one tokenisation of a step at most; the thread is a daemon regardless


def stage_texts(stage: str, batch: list) -> tuple[list[list[str]], list[float] | None]:
    """The sentences of each view of ``batch`` and the stage-2 gold scores.

    Stage 1 (triplets): anchor, positive[, hard negative when every triplet has one], no
    scores; stage 2 (scored pairs): sentence1, sentence2 and the scores.
    """
    if stage == "stage1":
        texts = [[t.anchor for t in batch], [t.positive for t in batch]]
        if all(t.hard_negative is not None for t in batch):
            texts.append([t.hard_negative for t in batch])
        return texts, None
    return [[p.sentence1 for p in batch], [p.sentence2 for p in batch]], [p.score for p in batch]


def tokenize_views(embedder, stage: str, batch: list, max_length: int
                   ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
    """Token batches per view on the model's device, and stage-2 gold scores (``[B]`` fp32).

    Each view is padded to its longest row here; :class:`pcc_dist.gradcache.GradCache` trims
    every length-sorted chunk to the chunk's own longest row.

    Shape:
        views[v]["input_ids"], views[v]["attention_mask"]: ``[B, L_v]`` int64.
    """
    texts, scores = stage_texts(stage, batch)
    device = embedder.device
    views = [{k: v.to(device) for k, v in embedder.tokenize(t, max_length=max_length).items()}
             for t in texts]
    if scores is not None:
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
    return views, scores


class Prefetcher:
    """``produce(step)`` for ``steps`` in order, computed ahead in a daemon thread.

    Args:
        produce: step number -> item (called in the worker thread only).
        steps: the step numbers, in the order :meth:`get` will ask for them.
        depth: items computed ahead at most (queue size).

    Example:
        >>> with Prefetcher(lambda s: tokenise(s), range(start, total)) as ahead:
        ...     for step in range(start, total):
        ...         views = ahead.get(step)
    """

    def __init__(self, produce: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(produce, list(steps)),
                                        name="pcc-tokenise-ahead", daemon=True)
        self._thread.start()

    def _work(self, produce: Callable[[int], Any], steps: list[int]) -> None:
        for step in steps:
            if self._stop.is_set():
                return
            try:
                item = (step, produce(step), None)
            except BaseException as exc:  # handed to the main thread, which re-raises it
                item = (step, None, exc)
            if not self._put(item) or item[2] is not None:
                return

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> Any:
        """The item of ``step`` (blocks until it is ready); re-raises ``produce``'s exception."""
        while True:
            try:
                got, item, exc = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the tokenise-ahead thread ended before step {step}"
                                       ) from None
        if exc is not None:
            raise exc
        if got != step:
            raise RuntimeError(f"tokenise-ahead order broken: step {step} asked, {got} ready")
        return item

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the worker and wait for it (at most one ``produce`` call in progress)."""
        self._stop.set()
        self._thread.join(timeout=_JOIN_S)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
