"""Bytes through the collectives per step: our cross-rank Pearson vs an all-gather implementation.

A real 2-rank gloo process group on this machine (two processes), per-rank batch B = 64 … 4,096
pairs, D = 4,096 (a 7B model's hidden size), fp32:

* ``ours``: :class:`pcc_dist.losses.PearsonLoss` (torch kernel): one all-reduce of the six
  float64 moment sums in the forward, nothing in the backward (closed-form local gradient).
* ``all_gather``: what a naive cross-rank loss does: all-gather both embeddings (with autograd,
  :func:`pcc_dist.distributed.all_gather_with_grad`, whose backward all-reduces the gathered
  gradient) and the scores, then compute Pearson on the union batch.

Counting: :class:`CommCounter` replaces the ``torch.distributed`` collectives (``all_reduce``,
``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter``, ``reduce_scatter_tensor``,
``broadcast``, ``all_to_all_single``) by wrappers that add up, per call, the bytes of the tensors
handed to the collective: ``input_bytes`` is what this rank contributes, ``output_bytes`` what it
ends up holding from the collective (for an all-gather, W times its input). Forward and backward
are counted separately. Wall times are recorded too (secondary: both ranks share 2 cores).

Usage:
    python benchmarks/comm_bytes.py [--batches 64 256 1024 4096] [--dim 4096]

Writes ``benchmarks/results/comm_bytes.json`` and ``comm_bytes.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import RESULTS_DIR, machine_facts, write_result  # noqa: E402

from pcc_dist.distributed import free_port  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all_single", "_all_gather_base",
               "_reduce_scatter_base")


def _nbytes(obj: Any) -> int:
    """Bytes of a tensor or a list/tuple of tensors (0 for anything else)."""
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(t) for t in obj)
    if hasattr(obj, "numel") and hasattr(obj, "element_size"):
        return int(obj.numel() * obj.element_size())
    return 0


def _io_bytes(name: str, args: tuple, kwargs: dict) -> tuple[int, int]:
    """(input bytes, output bytes) of one collective call, from its tensor arguments."""
    def arg(i: int, key: str):
        return args[i] if len(args) > i else kwargs.get(key)

    if name in ("all_reduce", "broadcast"):
        n = _nbytes(arg(0, "tensor"))
        return n, n
    if name == "all_gather":  # (tensor_list, tensor)
        return _nbytes(arg(1, "tensor")), _nbytes(arg(0, "tensor_list"))
    if name in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
                "_reduce_scatter_base", "all_to_all_single"):  # (output, input)
        output = args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))
        inp = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
        return _nbytes(inp), _nbytes(output)
    if name == "reduce_scatter":  # (output, input_list)
        return _nbytes(arg(1, "input_list")), _nbytes(arg(0, "output"))
    return 0, 0


class CommCounter:
    """Counts calls and tensor bytes passing through ``torch.distributed`` collectives.

    Use as a context manager; :meth:`phase` names the part being counted. Modules that call
    ``dist.<collective>`` through the ``torch.distributed`` module object (pcc_dist, DeepSpeed's
    torch backend) are seen; code that bound a collective to a local name before the patch is not.

    Example:
        >>> with CommCounter() as counter, counter.phase("forward"):  # doctest: +SKIP
        ...     loss = loss_fn(a, b, y)
        >>> counter.totals["forward"]["input_bytes"]  # doctest: +SKIP
        48
    """

    def __init__(self, module: Any = None) -> None:
        if module is None:
            import torch.distributed as module  # noqa: PLC0415
        self._module = module
        self._originals: dict[str, Any] = {}
        self._phase = "default"
        self.calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    def _wrap(self, name: str, fn):
        def counted(*args, **kwargs):
            inp, out = _io_bytes(name, args, kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                # Seconds inside the call: the whole collective when synchronous, only the
                # launch when async_op=True (the wait happens elsewhere).
                self.calls.append({"phase": self._phase, "op": name, "input_bytes": inp,
                                   "output_bytes": out,
                                   "seconds": time.perf_counter() - start})

        counted.__wrapped__ = fn
        return counted

    def __enter__(self) -> CommCounter:
        for name in COLLECTIVES:
            fn = getattr(self._module, name, None)
            if fn is not None:
                self._originals[name] = fn
                setattr(self._module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._originals.items():
            setattr(self._module, name, fn)
        self._originals.clear()

    @property
    def totals(self) -> dict[str, dict[str, Any]]:
        """``{phase: {"calls", "input_bytes", "output_bytes", "ops": {op: calls}}}``."""
        out: dict[str, dict[str, Any]] = {}
        for call in self.calls:
            entry = out.setdefault(call["phase"], {"calls": 0, "input_bytes": 0,
                                                   "output_bytes": 0, "seconds": 0.0,
                                                   "ops": defaultdict(int)})
            entry["calls"] += 1
            entry["seconds"] += call.get("seconds", 0.0)
            entry["input_bytes"] += call["input_bytes"]
            entry["output_bytes"] += call["output_bytes"]
            entry["ops"][call["op"]] += 1
        for entry in out.values():
            entry["ops"] = dict(entry["ops"])
        return out

    def reset(self) -> None:
        self.calls.clear()


def _pearson_union(a, b, y):
    """1 − r on tensors that already hold the whole batch (no collectives)."""
    import torch
    import torch.nn.functional as F

    x = F.cosine_similarity(a, b, dim=1)
    xc, yc = x - x.mean(), y - y.mean()
    return 1 - (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())


def _worker(rank: int, world: int, port: int, batches: list[int], dim: int, out_file: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from pcc_dist.distributed import all_gather_with_grad
    from pcc_dist.losses import PearsonLoss

    ours = PearsonLoss(kernel="torch")

    def gathered(a, b, y):
        sizes = [a.shape[0]] * world
        ys = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(ys, y)
        return _pearson_union(all_gather_with_grad(a, sizes=sizes),
                              all_gather_with_grad(b, sizes=sizes), torch.cat(ys))

    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(1000 * batch + rank)
        a = torch.randn(batch, dim, generator=gen)
        b = a * 0.5 + torch.randn(batch, dim, generator=gen)
        y = torch.rand(batch, generator=gen) * 5
        for name, fn in (("ours", ours), ("all_gather", gathered)):
            aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
            with CommCounter() as counter:
                dist.barrier()
                start = time.perf_counter()
                with counter.phase("forward"):
                    loss = fn(aa, bb, y)
                mid = time.perf_counter()
                with counter.phase("backward"):
                    loss.backward()
                end = time.perf_counter()
            totals = counter.totals
            rows.append({"batch_per_rank": batch, "impl": name, "loss": loss.item(),
                         "forward": totals.get("forward", {"calls": 0, "input_bytes": 0,
                                                           "output_bytes": 0, "ops": {}}),
                         "backward": totals.get("backward", {"calls": 0, "input_bytes": 0,
                                                             "output_bytes": 0, "ops": {}}),
                         "forward_seconds": mid - start, "backward_seconds": end - mid})
            del aa, bb, loss
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def _plot(rows: list[dict[str, Any]], dim: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, style in (("ours", "o-"), ("all_gather", "s--")):
        pts = [r for r in rows if r["impl"] == impl]
        xs = [r["batch_per_rank"] for r in pts]
        for phase, alpha in (("forward", 1.0), ("backward", 0.55)):
            ys = [max(r[phase]["output_bytes"], 1) for r in pts]
            ax.plot(xs, ys, style, alpha=alpha, label=f"{impl} {phase}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pairs per rank B (W = 2)")
    ax.set_ylabel("bytes through collectives per rank")
    ax.set_title(f"Cross-rank Pearson loss, D = {dim}, fp32 (backward 0 B plotted as 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--out", default="comm_bytes")
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "rows.json")
        mp.spawn(_worker, args=(world, free_port(), args.batches, args.dim, out_file),
                 nprocs=world, join=True)
        rows = json.loads(Path(out_file).read_text())
    by = {(r["batch_per_rank"], r["impl"]): r for r in rows}
    table = []
    for batch in args.batches:
        ours, other = by[(batch, "ours")], by[(batch, "all_gather")]
        ours_total = ours["forward"]["output_bytes"] + ours["backward"]["output_bytes"]
        other_total = other["forward"]["output_bytes"] + other["backward"]["output_bytes"]
        table.append({"batch_per_rank": batch, "ours_bytes": ours_total,
                      "all_gather_bytes": other_total,
                      "ratio_ours_over_all_gather": ours_total / other_total,
                      "all_gather_over_ours": other_total / max(ours_total, 1),
                      "loss_abs_difference": abs(ours["loss"] - other["loss"])})
        print(f"B={batch:5d}: ours {ours_total:>12,d} B, all-gather {other_total:>14,d} B, "
              f"ratio {ours_total / other_total:.2e}", flush=True)
    png = RESULTS_DIR / f"{args.out}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.dim, png)
    document = {
        "benchmark": "comm_bytes",
        "what": "bytes through torch.distributed collectives per step on rank 0 of a real "
                "2-rank gloo group: our cross-rank Pearson (one all-reduce of 6 float64) vs "
                "all-gather embeddings then compute, forward and backward",
        "machine": machine_facts(),
        "world_size": world,
        "dim": args.dim,
        "dtype": "float32 embeddings",
        "counting": "monkeypatched torch.distributed collectives; input_bytes = tensor bytes "
                    "this rank passes in, output_bytes = tensor bytes it holds afterwards "
                    "(all-gather: W x input); ratios use output bytes, forward + backward",
        "rows": rows,
        "table": table,
        "plot": str(png.relative_to(RESULTS_DIR.parent.parent)),
    }
    path = write_result(args.out, document)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
