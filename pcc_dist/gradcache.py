"""Gradient cache: batch-size-independent activation memory for losses over embeddings.

GradCache (Gao et al., 2021) splits one training step of a loss L(e_1, ..., e_N) that depends on
the parameters θ only through the embeddings e_i = f_θ(x_i) into three phases:

1. embed the batch in chunks of C examples without autograd, keeping only the embeddings;
2. compute L on the cached embeddings with autograd and take G = ∂L/∂e (one collective loss, so
   cross-rank InfoNCE and Pearson see the whole global batch at once);
3. re-embed each chunk with autograd and back-propagate the surrogate <e_chunk, G_chunk>, whose
   parameter gradient is Σ_i (∂e_i/∂θ)ᵀ G_i = ∂L/∂θ restricted to the chunk (chain rule).

Activation memory is that of one chunk of C, whatever the micro batch B; the cost is a second
forward of every example. The re-run must see the same dropout masks as phase 1 (LoRA dropout
0.05), else G belongs to different embeddings than the ones back-propagated: the RNG state (torch
CPU and CUDA) is saved before each phase-1 chunk and restored before its phase-3 replay.

Scale factors (none are added here). Example with W = 2 ranks, B = 5 rows per rank, C = 2:
* the loss modules' backward writes W·∂L/∂e for this rank's rows (pcc_dist.losses: 2·∂L/∂e), so
  phase 2 caches exactly the gradient the plain path would back-propagate;
* the 3 chunk surrogates of a view (rows 2 + 2 + 1) give parameter gradients that sum to the
  view's 2·g_r; DeepSpeed divides each backward by the accumulation steps A = 1 (a linear
  division, so per chunk or per micro batch is the same) and averages over the W = 2 ranks:
  (1/2)·Σ_r 2·g_r = Σ_r g_r = ∂L/∂θ, the one-process gradient on the union batch of N = 10.
Dividing the surrogates by the chunk count (3 here) would be wrong: they are parts of one sum,
not samples of a mean.

Chunks are formed by length (:mod:`pcc_dist.length_chunks`): the rows of all views of the step
(anchors, positives, negatives; or sentence pairs' two sides) pooled, sorted by token count, cut
into consecutive chunks, each padded only to its own longest row; the embeddings go back to the
input order and are split per view before the loss, and G's rows are picked by each chunk's row
indices in phase 3. The loss sees the same rows, so the gradient is the same up to float
rounding, for fewer token positions (pooling lets a short anchor share a chunk with a short
positive instead of padding to the longest row of its own view). The plain path (no cache) embeds
the pooled rows in such length groups too, with autograd, then takes one backward. When one chunk
of C holds a whole view on every rank the cache is skipped: the plain path gives the same
gradient without the second forward.

Under ZeRO-3 every forward gathers parameters and every backward reduce-scatters gradients, so
every rank must run the same number of chunk forwards and backwards: the chunk count of each view
is agreed across ranks (one small all-reduce). Accumulation of the per-chunk backward calls into
one optimizer step is the engine's job (:meth:`pcc_dist.engine.TrainEngine.backward`).

References:
    Luyu Gao, Yunyi Zhang, Jiawei Han, Jamie Callan. Scaling Deep Contrastive Learning Batch Size
    under Memory Limited Setup. RepL4NLP 2021, arXiv:2101.06983.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pcc_dist import length_chunks
from pcc_dist.length_chunks import ChunkPlan, plan_chunks

logger = logging.getLogger(__name__)

TokenBatch = dict[str, Tensor]
# Rows per forward of the plain path's length groups (chunk_size=0): small enough that each group
# pads to a length close to its rows' own, large enough for efficient matrix products
# (benchmarks/padding.py compares group sizes).
PLAIN_CHUNK_ROWS = 16


def _batch_size(batch: TokenBatch) -> int:
    sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"a view's tensors must share their first dimension, got sizes {sizes}")
    return sizes.pop()


class _RngState:
    """The torch CPU generator and, if CUDA is in use, every CUDA device's generator."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _max_over_ranks(counts: list[int], device: torch.device) -> list[int]:
    """Per-view integers (view sizes), max over ranks (one all-reduce of len(views) integers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    if dist.get_backend() != "nccl":
        device = torch.device("cpu")
    agreed = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return [int(c) for c in agreed.tolist()]


def _on_split(loss_fn: Callable[[list[Tensor]], Tensor],
              pooled: length_chunks.PooledViews) -> Callable[[list[Tensor]], Tensor]:
    """``loss_fn`` of the per-view embeddings, fed the one embedding matrix of pooled views."""
    return lambda embeddings: loss_fn(pooled.split(embeddings[0]))


class GradCache:
    """Runs one micro batch of a loss over embeddings through the engine, chunked or not.

    Args:
        engine: A :class:`pcc_dist.engine.TrainEngine` (anything with ``__call__`` forwarding
            through DeepSpeed, ``module`` and ``backward(loss, *, boundary, loss_value)``).
        chunk_size: Examples per chunk C; 0 runs the plain path (length-grouped forwards of
            ``plain_rows`` rows with autograd, one backward).
        replay_rng: Restore each chunk's RNG state for its replay. Only tests turn it off (the
            negative control showing that un-replayed dropout changes the gradient).
        length_sorted: Form the chunks of a view from its rows sorted by token length, each
            padded only to its own longest row (:mod:`pcc_dist.length_chunks`); the embeddings
            go back to the input order before the loss; the views' rows are pooled first. False:
            per view, consecutive untrimmed rows, and one forward per view on the plain path
            (the reference the tests compare with).
        plain_rows: Rows per length-grouped forward on the plain path (``chunk_size=0``).

    Attributes:
        real_token_fraction: Of the last :meth:`run`, real tokens over processed (padded) token
            positions of this rank's views.

    Example:
        >>> cache = GradCache(engine, chunk_size=16)
        >>> loss = cache.run(engine.module, [anchors, positives, negatives],
        ...                  lambda e: info_nce(e[0], e[1], e[2]))
        >>> result = engine.step()
    """

    def __init__(self, engine: Any, chunk_size: int, *, replay_rng: bool = True,
                 length_sorted: bool = True, plain_rows: int = PLAIN_CHUNK_ROWS):
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be 0 (off) or positive, got {chunk_size}")
        if plain_rows < 1:
            raise ValueError(f"plain_rows must be positive, got {plain_rows}")
        self.engine = engine
        self.chunk_size = int(chunk_size)
        self.replay_rng = replay_rng
        self.length_sorted = length_sorted
        self.plain_rows = int(plain_rows)
        self.real_token_fraction = 1.0

    def _forward(self, embed: Callable[[TokenBatch], Tensor] | nn.Module,
                 batch: TokenBatch) -> Tensor:
        # The engine's own module is run through the engine, so that DeepSpeed sees the forward
        # (its hooks make the following backward accumulate under ZeRO-3).
        if embed is self.engine or embed is getattr(self.engine, "module", None):
            return self.engine(**batch)
        return embed(batch)

    def run(self, embed: Callable[[TokenBatch], Tensor] | nn.Module, views: Sequence[TokenBatch],
            loss_fn: Callable[[list[Tensor]], Tensor]) -> float:
        """Forward, loss and backward of one micro batch; the last backward closes it.

        The views' rows are pooled and embedded in chunks of consecutive length-sorted rows,
        each trimmed to its longest row; the embeddings are put back in input order and split
        per view before ``loss_fn``. With the cache on (``chunk_size`` C > 0) the N = Σ_v B_v
        pooled rows take ceil(N / C) chunks, forwarded twice; when every view on every rank has
        B_v <= C the cache is skipped (the plain path computes the same gradient without the
        second forward). The plain path takes ceil(N / ``plain_rows``) autograd forwards and
        one backward.

        Args:
            embed: The engine's module (run as ``engine(**batch)``), or a callable mapping one
                token batch to embeddings that itself calls the engine.
            views: This rank's token batches, one per view (stage 1: anchor, positive[,
                negative]; stage 2: a, b), already on the model's device.
            loss_fn: Maps the list of per-view embeddings (in ``views`` order) to the scalar loss
                this rank back-propagates (the cross-rank loss modules gather internally).

        Returns:
            The loss value (a float, same on every rank for the global losses).

        Shape:
            - views[v][key]: ``[B, L]``
            - embed output: ``[b_k, D]`` per chunk
            - loss_fn input: list of ``[B, D]`` in input row order
        """
        if not views:
            raise ValueError("GradCache.run needs at least one view")
        sizes = [_batch_size(view) for view in views]
        device = next(iter(views[0].values())).device
        # Every rank must take the cached path or none (ZeRO-3 pairs their forwards): decided on
        # the view sizes agreed across ranks.
        agreed = _max_over_ranks(sizes, device)
        cached = self.chunk_size > 0 and max(agreed) > self.chunk_size
        if self.length_sorted and len(views) > 1:
            pooled = length_chunks.pool_views(views)
            views, sizes, agreed = [pooled.view], [sum(sizes)], [sum(agreed)]
            loss_fn = _on_split(loss_fn, pooled)
        plans = self._plan(views, sizes, agreed, cached)
        self.real_token_fraction = length_chunks.real_token_fraction(plans)
        if not cached:
            return self._run_plain(embed, views, plans, loss_fn)
        return self._run_cached(embed, views, plans, loss_fn)

    def _plan(self, views: Sequence[TokenBatch], sizes: list[int], agreed: list[int],
              cached: bool) -> list[ChunkPlan]:
        """Per view, its chunks: ceil(B / C) of them (``plain_rows`` rows each on the plain
        path), counted from the sizes agreed across ranks so that every rank runs as many
        forwards; the unsorted reference takes one forward per view on the plain path."""
        if not self.length_sorted and not cached:
            return [plan_chunks(view, 1, sort=False) for view in views]
        rows = self.chunk_size if cached else self.plain_rows
        counts = [math.ceil(b / rows) for b in agreed]
        for b, n in zip(sizes, counts, strict=True):
            if b < n:
                raise ValueError(
                    f"this rank holds {b} rows in a view but another rank splits that view into "
                    f"{n} chunks of {rows}; every rank must get the same micro batch "
                    "size, or ZeRO-3's per-forward collectives would not pair up.")
        return [plan_chunks(view, n, sort=self.length_sorted)
                for view, n in zip(views, counts, strict=True)]

    def _embed_view(self, embed, view: TokenBatch, plan: ChunkPlan) -> Tensor:
        reps = [self._forward(embed, plan.take(view, k)) for k in range(len(plan.rows))]
        return plan.restore(torch.cat(reps) if len(reps) > 1 else reps[0])

    def _run_plain(self, embed, views, plans, loss_fn) -> float:
        with torch.enable_grad():
            embeddings = [self._embed_view(embed, v, p) for v, p in zip(views, plans, strict=True)]
            loss = loss_fn(embeddings)
        value = float(loss.detach().float().item())
        self.engine.backward(loss, boundary=True, loss_value=value)
        return value

    def _run_cached(self, embed, views, plans, loss_fn) -> float:
        chunks = [[plan.take(view, k) for k in range(len(plan.rows))]
                  for view, plan in zip(views, plans, strict=True)]

        # Phase 1: embeddings without autograd; RNG state before each chunk for the replay.
        states: list[list[_RngState]] = []
        cached: list[Tensor] = []
        with torch.no_grad():
            for view_chunks, plan in zip(chunks, plans, strict=True):
                reps, view_states = [], []
                for chunk in view_chunks:
                    view_states.append(_RngState())
                    reps.append(self._forward(embed, chunk))
                states.append(view_states)
                cached.append(plan.restore(torch.cat(reps)).detach())

        # Phase 2: the loss on the whole (global) batch and its gradient w.r.t. the embeddings
        # (rows in input order, as the loss saw them).
        with torch.enable_grad():
            leaves = [e.requires_grad_(True) for e in cached]
            loss = loss_fn(leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        value = float(loss.detach().float().item())
        grads = [torch.zeros_like(e) if g is None else g.detach()
                 for e, g in zip(leaves, grads, strict=True)]
        del loss, leaves, cached

        # Phase 3: replay each chunk with autograd and back-propagate <e_chunk, G_chunk>, G's
        # rows picked by the chunk's input row indices.
        # fork_rng puts the generators back afterwards, so the stream continues exactly as after
        # phase 1 (the replay does not consume randomness twice).
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() \
            else []
        total = sum(len(p.rows) for p in plans)
        done = 0
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            for v, view_chunks in enumerate(chunks):
                for k, chunk in enumerate(view_chunks):
                    if self.replay_rng:
                        states[v][k].restore()
                    emb = self._forward(embed, chunk)
                    grad = grads[v].index_select(0, plans[v].rows[k].to(grads[v].device))
                    surrogate = torch.sum(emb * grad.to(emb.dtype))
                    done += 1
                    # Each call is divided by the accumulation steps inside the engine; the
                    # chunk gradients add up to the micro batch's, so the division applies to
                    # the micro batch once (derivation on TrainEngine.backward).
                    self.engine.backward(surrogate, boundary=done == total, loss_value=value)
        logger.debug("gradient cache: %d views, %s chunks of <= %d, loss %.6g", len(views),
                     [len(p.rows) for p in plans], self.chunk_size, value)
        return value
