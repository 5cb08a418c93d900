"""Deterministic global-batch plan: which examples each rank trains on at each optimizer step.

The plan is a pure function of ``(seed, epoch, step, world_size, rank)``. Nothing is iterated or
buffered, so resuming at step k needs only k: the next batch is exactly the one the interrupted
run would have seen. The global batch of a step is the same set *in the same order* for every
world size; rank r takes the contiguous rows ``[r * B, (r + 1) * B)`` of it, which is also the
row order of an all-gather, so cross-rank losses see the global batch exactly as one process
would (labels of InfoNCE are offset by ``r * B``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchPlan:
    """Epoch-wise shuffled, drop-last global batches split into equal per-rank slices.

    Args:
        num_examples: Size of the training set.
        global_batch_size: N, examples per optimizer step over all ranks.
        world_size: W; must divide N.
        seed: Base seed; epoch e uses a permutation drawn from ``seed + e``.

    The last ``num_examples % N`` examples of each epoch's permutation are dropped: a smaller
    final batch would change the statistics of the Pearson loss (r over fewer pairs) and break
    the equal-batch assumption of collective operations. Reshuffling makes a different subset
    drop each epoch, so every example is still seen.
    """

    num_examples: int
    global_batch_size: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by the world size "
                f"{self.world_size}; choose a global batch that is a multiple of the number of "
                "ranks (every rank must hold the same number of examples).")
        if self.num_examples < self.global_batch_size:
            raise ValueError(
                f"the training set has {self.num_examples} examples, fewer than one global "
                f"batch ({self.global_batch_size}); lower the stage's global_batch_size.")

    @property
    def per_rank(self) -> int:
        """B = N / W."""
        return self.global_batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def total_steps(self, epochs: float, max_steps: int | None = None) -> int:
        """Optimizer steps for ``epochs`` (fractions allowed), capped by ``max_steps``."""
        steps = max(1, int(epochs * self.steps_per_epoch))
        return min(steps, max_steps) if max_steps is not None else steps

    def global_indices(self, step: int) -> list[int]:
        """The N example indices of global step ``step`` (0-based), in global row order."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        start = position * self.global_batch_size
        return order[start:start + self.global_batch_size].tolist()

    def rank_indices(self, step: int, rank: int) -> list[int]:
        """The B indices rank ``rank`` trains on at ``step``: rows [rank*B, (rank+1)*B)."""
        rows = self.global_indices(step)
        return rows[rank * self.per_rank:(rank + 1) * self.per_rank]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch
