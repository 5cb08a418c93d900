"""Length-aware chunks of one view: sort its rows by token length, pad each chunk to its own
longest row, put the embeddings back in the original order. The views of one step are pooled
into one such view first (:func:`pool_views`), so rows of similar length share a chunk whichever
view they come from.

A view (one rank's micro batch of one side: anchors, positives, sentence1, ...) padded to its
longest row wastes most of its tokens on padding (``benchmarks/padding.py`` measures how much
on the stage-2 set). The losses only see the embeddings, row by row, so the rows may be embedded
in any grouping and order as long as the embedding matrix handed to the loss has the original
row order:

1. ``order`` = the rows sorted by real-token count, longest first (stable: ties keep their
   order, so the plan is a pure function of the mask); longest first so that an out-of-memory
   error shows at the first chunk;
2. ``order`` is cut into ``pieces`` near-equal consecutive parts (``torch.tensor_split``: the
   first ``B mod pieces`` parts get one row more), chunk k = rows ``order[part k]``;
3. chunk k keeps only the columns ``[start_k, stop_k)`` that hold a real token in one of its
   rows: a prefix for right padding (encoders), a suffix for left padding (decoders). Dropped
   columns are padding in every row of the chunk, masked out of attention and pooling, and
   decoder positions come from the mask (``Embedder.forward``), so the embeddings are those of
   the untrimmed rows up to float rounding;
4. the embeddings of the chunks, concatenated in chunk order, are rows ``order`` of the view;
   ``restore`` applies the inverse permutation ``inv[order[i]] = i``.

The in-batch negatives (InfoNCE) and the Pearson batch are unchanged: which examples share a
step is the sampler's decision (:mod:`pcc_dist.sampling`), not this module's.

Example (B = 5 rows of lengths [3, 7, 2, 7, 5], 2 pieces):
    order = [1, 3, 4, 0, 2]; chunks [1, 3, 4] (width 7) and [0, 2] (width 3): 5*7 = 35 padded
    tokens become 3*7 + 2*3 = 27.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TokenBatch = dict[str, Tensor]
MASK_KEY = "attention_mask"


def length_order(lengths: Tensor, *, sort: bool = True) -> Tensor:
    """Row indices sorted by length, longest first, ties in input order (``[B]`` int64).

    ``sort=False`` gives the identity (the unsorted reference path).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if not sort:
        return torch.arange(lengths.numel())
    return torch.sort(lengths, descending=True, stable=True).indices


def inverse_permutation(order: Tensor) -> Tensor:
    """``inv`` with ``inv[order[i]] = i``: ``x_sorted[inv]`` puts rows back in input order."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), dtype=order.dtype)
    return inv


def column_span(mask: Tensor) -> tuple[int, int]:
    """``[start, stop)`` of the columns holding a real token in any row of ``mask`` ``[b, L]``.

    A prefix for right padding, a suffix for left padding; the whole width when no row holds a
    real token (nothing to trim safely).
    """
    used = torch.nonzero(mask.any(dim=0)).flatten()
    if used.numel() == 0:
        return 0, int(mask.shape[1])
    return int(used[0]), int(used[-1]) + 1


@dataclass(frozen=True)
class ChunkPlan:
    """How one view of B rows is embedded: which rows go in each chunk, and which columns.

    Attributes:
        rows: per chunk, the original row indices (``[b_k]`` int64 on CPU), in chunk order.
        spans: per chunk, the kept column range ``[start, stop)`` of the ``[B, L]`` tensors.
        width: L, the view's padded width.
        real_tokens: attention-mask ones in the view.
    """

    rows: tuple[Tensor, ...]
    spans: tuple[tuple[int, int], ...]
    width: int
    real_tokens: int

    @property
    def order(self) -> Tensor:
        """All rows in chunk order (``[B]``)."""
        return torch.cat(self.rows)

    @property
    def trivial(self) -> bool:
        """One chunk of every row in input order, untrimmed: the view itself."""
        return (len(self.rows) == 1 and self.spans[0] == (0, self.width)
                and torch.equal(self.rows[0], torch.arange(self.rows[0].numel())))

    @property
    def processed_tokens(self) -> int:
        """Token positions of one forward of every chunk: ``Σ_k b_k · (stop_k - start_k)``."""
        return sum(int(r.numel()) * (b - a) for r, (a, b) in zip(self.rows, self.spans,
                                                                  strict=True))

    def take(self, view: TokenBatch, k: int) -> TokenBatch:
        """Chunk ``k`` of ``view``: its rows, and of ``[B, L]`` tensors only its columns."""
        if self.trivial:
            return view
        a, b = self.spans[k]
        out = {}
        for key, tensor in view.items():
            part = tensor.index_select(0, self.rows[k].to(tensor.device))
            if part.dim() >= 2 and part.shape[1] == self.width:
                part = part[:, a:b]
            out[key] = part
        return out

    def restore(self, stacked: Tensor) -> Tensor:
        """Embeddings of the chunks concatenated in chunk order (``[B, D]``), in input order."""
        if self.trivial:
            return stacked
        return stacked[inverse_permutation(self.order).to(stacked.device)]


def plan_chunks(view: TokenBatch, pieces: int, *, sort: bool = True) -> ChunkPlan:
    """The :class:`ChunkPlan` of ``view`` in ``pieces`` chunks (see the module docstring).

    Args:
        view: token tensors ``[B, L]`` (``attention_mask`` among them; without one every row
            counts as full length and nothing is sorted or trimmed).
        pieces: the chunk count, 1 <= pieces <= B (agreed across ranks by the caller).
        sort: False gives the unsorted reference: consecutive rows, untrimmed, exactly the
            ``tensor_split`` chunks of the view.
    """
    mask = view.get(MASK_KEY)
    if mask is None:
        any_tensor = next(iter(view.values()))
        size, width = int(any_tensor.shape[0]), int(any_tensor.shape[-1])
        mask = torch.ones((size, width), dtype=torch.int64)
        sort = False
    mask = mask.detach().to("cpu")
    size, width = int(mask.shape[0]), int(mask.shape[1])
    if not 1 <= pieces <= size:
        raise ValueError(f"cannot split a view of {size} rows into {pieces} chunks")
    order = length_order(mask.sum(dim=1), sort=sort and pieces > 1)
    rows = tuple(torch.tensor_split(order, pieces))
    spans = tuple(column_span(mask[r]) if sort else (0, width) for r in rows)
    return ChunkPlan(rows=rows, spans=spans, width=width, real_tokens=int(mask.sum()))


def real_token_fraction(plans: list[ChunkPlan]) -> float:
    """Real tokens over processed (padded) token positions of one step's views on this rank."""
    processed = sum(p.processed_tokens for p in plans)
    return sum(p.real_tokens for p in plans) / processed if processed else 1.0


@dataclass(frozen=True)
class PooledViews:
    """Several views of one step as one token batch, so that their rows are sorted and chunked
    together: a short anchor and a short positive share a chunk instead of each padding a chunk
    of its own view.

    Attributes:
        view: the views' rows stacked in view order (``[Σ_v B_v, L_max]``), each view widened to
            the widest with padding columns on its padding side.
        sizes: B_v per view, to split the embeddings back (:meth:`split`).
    """

    view: TokenBatch
    sizes: tuple[int, ...]

    def split(self, embeddings: Tensor) -> list[Tensor]:
        """``[Σ_v B_v, D]`` embeddings in stacked order -> one ``[B_v, D]`` tensor per view."""
        return list(torch.split(embeddings, list(self.sizes)))


def padding_side(views: Sequence[TokenBatch]) -> str:
    """``"left"`` or ``"right"``: where the views' padding columns are, read off their masks.

    A row with a padding column before its first real token is left padded, one with a padding
    column after its last real token right padded. Views without any padding fit either side;
    then ``"right"``: real tokens keep their positions (decoder positions come from the mask,
    ``Embedder.forward``) and ``last`` pooling finds the last real token on either side.

    Raises:
        ValueError: when some rows are padded on the left and others on the right (views from
            two tokenizers: their rows must not share a forward).
    """
    left = right = False
    for view in views:
        mask = view.get(MASK_KEY)
        if mask is None:
            continue
        mask = mask.detach().to("cpu").bool()
        real = mask.any(dim=1)
        left |= bool((real & ~mask[:, 0]).any())
        right |= bool((real & ~mask[:, -1]).any())
    if left and right:
        raise ValueError("views padded on both sides cannot share a forward (two tokenizers?)")
    return "left" if left else "right"


def pool_views(views: Sequence[TokenBatch]) -> PooledViews:
    """Stack ``views`` into one token batch (see :class:`PooledViews`).

    Every ``[B_v, L_v]`` tensor is widened to ``L_max`` with zeros (attention mask 0, so the
    new columns are padding: masked out of attention and pooling, dropped again by a chunk's
    column trim) on the views' :func:`padding_side`, then the views are concatenated row-wise.

    Raises:
        ValueError: when the views do not hold the same tensor names.
    """
    keys = [sorted(view) for view in views]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"views to pool must hold the same tensors, got {keys}")
    shapes = [next(iter(view.values())).shape for view in views]  # [B_v, L_v] each
    sizes = tuple(int(shape[0]) for shape in shapes)
    widths = [int(shape[-1]) for shape in shapes]
    width = max(widths)
    left = padding_side(views) == "left"
    stacked = {}
    for key in keys[0]:
        parts = []
        for view, w in zip(views, widths, strict=True):
            tensor = view[key]
            if tensor.dim() >= 2 and w < width:
                pad = tensor.new_zeros((tensor.shape[0], width - w, *tensor.shape[2:]))
                tensor = torch.cat([pad, tensor] if left else [tensor, pad], dim=1)
            parts.append(tensor)
        stacked[key] = torch.cat(parts)
    return PooledViews(view=stacked, sizes=sizes)
