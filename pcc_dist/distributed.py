"""The process group: starting it, rank helpers, and autograd-aware collectives.

:func:`init_distributed` starts (or joins) the process group: ``gloo`` on CPU, ``nccl`` on CUDA,
under ``torchrun``, the ``deepspeed`` launcher or no launcher at all (a 1-rank group on a free
port). It imports DeepSpeed lazily (:func:`import_deepspeed`), so that this module and everything
built on it work with torch alone.

Every other function here degrades to the single-process answer when ``torch.distributed`` is
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

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "AllGatherWithGrad",
    "DistInfo",
    "all_gather_sizes",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "free_port",
    "get_rank",
    "get_world_size",
    "import_deepspeed",
    "init_distributed",
    "is_distributed",
    "rank_barrier",
    "shutdown_distributed",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it), for a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def import_deepspeed() -> Any:
    """``import deepspeed``, or an ImportError that says how to install it."""
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "the training engine needs DeepSpeed: pip install 'deepspeed>=0.19.3,<0.20' "
            "(a core dependency of pcc-dist; reinstall with `pip install -e .`)") from exc
    return deepspeed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank in ``[0, world_size)``.
        world_size: Number of ranks W.
        local_rank: Rank on this node (selects the CUDA device).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes shared files."""
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Start the process group, or return the one already running.

    Works under ``torchrun`` and the ``deepspeed`` launcher (both export ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and without a launcher: a plain
    ``python train.py`` gets a 1-rank group on 127.0.0.1 and a free port, because DeepSpeed needs
    an initialised group even for W = 1. Idempotent.

    Returns:
        Rank, world size, local rank and backend of this process.
    """
    deepspeed = import_deepspeed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            # No launcher: a 1-rank group. setdefault keeps a MASTER_ADDR/PORT the user exported.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("LOCAL_RANK", "0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        _init_group_on_a_fresh_store_after_restart(backend)
        # auto_mpi_discovery=False: the env vars above are complete, and MPI discovery would
        # need mpi4py. (With the group already up, DeepSpeed only wraps it.)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    else:
        backend = dist.get_backend()
        # Registers DeepSpeed's communication backend on top of the existing group.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   verbose=False)
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)
    logger.debug("process group: %s", info)
    return info


def _init_group_on_a_fresh_store_after_restart(backend: str) -> None:
    """Start the process group under a key prefix of its own when torchrun restarted the workers.

    ``torchrun --max-restarts N`` with its default static rendezvous keeps ONE TCPStore in the
    agent for the whole job, and the workers' ``env://`` init adds no per-attempt prefix (torch
    2.13 assumes a new store per attempt). The restarted group then reads the addresses that the
    dead attempt's ranks published and gloo fails with "connectFullMesh failed ... Connection
    refused", so a restart could never resume. Prefixing the store with
    ``TORCHELASTIC_RESTART_COUNT`` gives every attempt clean keys. A no-op outside a torchrun
    agent store, and on the first attempt, whose keys are clean anyway.
    """
    from torch.distributed.constants import default_pg_timeout as timeout

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or attempt == "0":
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pcc_attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    logger.info("torchrun restart %s: process group started on fresh store keys", attempt)


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

    For code that is handed a barrier (:class:`pcc_dist.checkpoint_manager.CheckpointManager`): a
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
