"""Rank helpers and autograd-aware collectives that also work without a process group.

Every function here degrades to the single-process answer when ``torch.distributed`` is
unavailable or no process group is initialised (rank 0, world size 1, identity gather, no-op
reduce), so losses and tests call them unconditionally.

Collectives are looked up as ``dist.<name>`` at call time (never ``from torch.distributed import
...``) so that tests can count them by patching ``torch.distributed``.

Gradient semantics of :func:`all_gather_with_grad` follow the rule used across pcc_dist: each
rank's autograd graph ends in its *share* of one global loss, and the shares sum to the global loss.
The backward of the gather therefore sums the incoming gradients over ranks (see the derivation on
:class:`AllGatherWithGrad`). This is the behaviour pytorch #58005 asked
``torch.distributed.nn.all_gather`` to have; we implement it explicitly so that it does not depend
on the torch version.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "AllGatherWithGrad",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "free_port",
    "get_rank",
    "get_world_size",
    "is_distributed",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it), for a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """Rank of this process in ``group`` (default group), 0 without a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks W in ``group`` (default group), 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (one collective); a no-op with W = 1.

    Not autograd-aware: use it on statistics and detached values.

    Args:
        tensor: Tensor to reduce; modified in place.
        group: Process group; default group when None.

    Returns:
        ``tensor`` itself, now holding the sum over ranks.
    """
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (one collective); a no-op with W = 1.

    Args:
        tensor: Floating tensor to reduce; modified in place.
        group: Process group; default group when None.

    Returns:
        ``tensor`` itself, now holding the mean over ranks.
    """
    world_size = get_world_size(group)
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world_size)
    return tensor


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``flag`` is True on at least one rank; every rank gets the same answer.

    For decisions that must not diverge (a rank that takes another branch than its peers would
    wait in a collective they never join). One all-reduce of one integer; ``flag`` itself when
    W = 1.

    Args:
        flag: This rank's finding.
        group: Process group; default group when None.

    Returns:
        True on every rank if any rank passed True.
    """
    if get_world_size(group) == 1:
        return flag
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    count = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    return bool(all_reduce_sum(count, group).item())


def all_gather_sizes(
    values: Sequence[int],
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> list[list[int]]:
    """Gather a few integers from every rank (one collective of ``len(values)`` int64 per rank).

    Typical use: per-rank batch sizes before a variable-size gather.

    Args:
        values: This rank's integers; every rank must pass the same count.
        group: Process group; default group when None.
        device: Device of the staging tensor; must suit the backend (CPU for gloo, CUDA for NCCL).
            Defaults to CPU.

    Returns:
        ``out[r]`` is rank r's ``values`` as a list, for every rank r (``[list(values)]`` if W = 1).
    """
    world_size = get_world_size(group)
    if world_size == 1:
        return [list(values)]
    local = torch.tensor(list(values), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    return [t.tolist() for t in gathered]


class AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0, with the gradient routed back to its owner.

    Derivation of the backward. Let x_r be rank r's input and y = cat(x_0, ..., x_{W-1}) the
    output, identical on every rank. Rank r' back-propagates its own scalar ℓ_{r'}(y); the
    quantity being minimised is the global loss L = Σ_{r'} ℓ_{r'} (each rank holds a share).
    Then ∂L/∂x_r = Σ_{r'} (∂ℓ_{r'}/∂y)[rows of r], so the backward all-reduces (SUM) the
    incoming gradient and keeps this rank's rows. Returning only the local slice of the local
    gradient (no reduction) would drop the other ranks' terms; averaging instead of summing would
    shrink the gradient by 1/W.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
        rank = get_rank(group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.size = sizes[rank]
        # gloo/NCCL all_gather needs equal shapes: pad every rank to the largest dim 0, trim after.
        max_rows = max(sizes)
        padded = tensor.new_zeros((max_rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buffers, padded, group=group)
        return torch.cat([buf[:rows] for buf, rows in zip(buffers, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.size], None, None


def all_gather_with_grad(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """All-gather along dim 0 with autograd; ranks may hold different numbers of rows.

    Forward: ``cat([x_0, ..., x_{W-1}])`` in rank order on every rank. Backward: the incoming
    gradient is summed over ranks and each rank receives its own rows (derivation on
    :class:`AllGatherWithGrad`); every rank must therefore call backward.

    Args:
        tensor: This rank's rows.
        group: Process group; default group when None.
        sizes: Rows per rank, if already known (skips one small collective).

    Returns:
        The concatenation over ranks; ``tensor`` itself when W = 1.

    Shape:
        - tensor: ``[B_r, *]``
        - output: ``[Σ_r B_r, *]``
    """
    world_size = get_world_size(group)
    if world_size == 1:
        return tensor
    if sizes is None:
        device = tensor.device if dist.get_backend(group) == "nccl" else None
        sizes = [row[0] for row in all_gather_sizes([tensor.shape[0]], group, device)]
    if len(sizes) != world_size:
        raise ValueError(f"sizes has {len(sizes)} entries but the group has {world_size} ranks")
    if sizes[get_rank(group)] != tensor.shape[0]:
        raise ValueError(
            f"sizes[{get_rank(group)}] = {sizes[get_rank(group)]} but this rank's tensor has "
            f"{tensor.shape[0]} rows"
        )
    return AllGatherWithGrad.apply(tensor, list(sizes), group)


def rank_barrier(world_size: int) -> Callable[[], None]:
    """A barrier over every rank as a no-argument callable; a no-op for ``world_size`` 1.

    For code that is handed a barrier (:class:`pcc_dist.checkpoint.CheckpointManager`): a
    1-rank run needs none, and a 1-rank helper may run before any process group exists.
    """
    if world_size == 1:
        return lambda: None
    return lambda: dist.barrier()


def shutdown_distributed() -> None:
    """Wait for every rank, then close the process group (nothing to do without one).

    Without it a rank that finishes first exits while gloo still has a peer, and its process
    aborts ("terminate called without an active exception"), failing the launcher.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
