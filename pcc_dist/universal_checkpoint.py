"""Resume a ZeRO checkpoint on another world size through DeepSpeed's universal checkpoints.

DeepSpeed's ZeRO files (``<engine>/state/*_optim_states.pt``) hold each rank's flat partition of
the fp32 master weights and Adam moments, cut for the world size W that wrote them. DeepSpeed's
converter (``deepspeed.checkpoint.ds_to_universal``) merges them into one folder per tensor::

    <engine>/universal/zero/<param name>/fp32.pt        whole fp32 master weight
                                        /exp_avg.pt     Adam first moment  (same numel)
                                        /exp_avg_sq.pt  Adam second moment (same numel)

which fit any world size W' and any ZeRO stage. :func:`universal_state` converts a checkpoint
once (rank 0; the others wait at a barrier), caches the result inside the checkpoint's engine
folder, and returns the same mapping ``portable_state.pt`` holds, read tensor by tensor with
``torch.load(weights_only=True, mmap=True)`` so that nothing is unpickled as code and a 7B state
is paged in one tensor at a time rather than held whole.

DeepSpeed's own readers (the converter, ``load_universal``) unpickle with ``weights_only=False``;
the converter runs here under :func:`_weights_only_torch_load`, and the loading side is ours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pcc_dist.safe_loading import deepspeed_checkpoint_classes, weights_only_load

logger = logging.getLogger(__name__)

UNIVERSAL_DIR = "universal"
# The converter's per-tensor files: our name for each (portable_state.pt's keys) -> its file.
_STATE_FILES = {"params": "fp32.pt", "exp_avg": "exp_avg.pt", "exp_avg_sq": "exp_avg_sq.pt"}


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` in this block reads data only, whatever its caller asks for.

    The converter calls ``torch.load(..., weights_only=False)`` on every shard; it runs in this
    process on one thread (no worker pool), so replacing the function for its duration covers
    all of its reads.
    """
    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            return original(f, map_location, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert(state_dir: Path, out_dir: Path) -> None:
    """Run DeepSpeed's universal-checkpoint converter on ``state_dir`` into ``out_dir``.

    Written first into a sibling ``.tmp-universal-<checkpoint>`` folder (which the checkpoint
    manager deletes as a leftover if this process dies) and renamed into place when complete, so
    a half-written conversion is never inside a checkpoint (its integrity checks would call the
    checkpoint damaged) nor taken for a finished one.

    Raises:
        CheckpointError: the converter failed; names the checkpoint and its reason.
    """
    from deepspeed.checkpoint import ds_to_universal

    from pcc_dist.checkpoint import CheckpointError

    checkpoint = out_dir.parent.parent
    # The converter also writes a `latest_universal` pointer next to its output folder: keep it
    # in the scratch folder too, out of the checkpoints folder.
    scratch = checkpoint.parent / f".tmp-universal-{checkpoint.name}"
    work = scratch / UNIVERSAL_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    # One worker each: the converter's process pools would not see the weights-only torch.load.
    args = argparse.Namespace(input_folder=str(state_dir), output_folder=str(work),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    chatter = io.StringIO()  # the converter prints progress; keep it for the error message
    try:
        with _weights_only_torch_load(), contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
        work.rename(out_dir)
    except Exception as exc:  # noqa: BLE001 - any converter failure becomes one clear error
        shutil.rmtree(scratch, ignore_errors=True)
        tail = "\n".join(chatter.getvalue().splitlines()[-5:])
        raise CheckpointError(
            f"converting {state_dir} to a universal checkpoint (to resume it on another world "
            f"size) failed: {type(exc).__name__}: {exc}\n{tail}\nResume on the world size that "
            "wrote it (engine/world.json).") from exc
    shutil.rmtree(scratch, ignore_errors=True)


def _rank0_file(state_dir: Path, suffix: str) -> Path:
    """Rank 0's ``*<suffix>`` file: ZeRO-3 names it ``zero_pp_rank_0_mp_rank_00<suffix>``,
    ZeRO-1/2 ``mp_rank_00<suffix>`` (model) or ``*zero_pp_rank_0_mp_rank_00<suffix>``."""
    for name in (f"zero_pp_rank_0_mp_rank_00{suffix}", f"bf16_zero_pp_rank_0_mp_rank_00{suffix}",
                 f"mp_rank_00{suffix}"):
        if (state_dir / name).is_file():
            return state_dir / name
    raise FileNotFoundError(f"{state_dir} holds no rank-0 *{suffix} file")


def _adam_step(state_dir: Path) -> float:
    """Adam's step count from rank 0's optimizer file (every sub-group steps together)."""
    optim = weights_only_load(_rank0_file(state_dir, "_optim_states.pt"), mmap=True)
    inner = optim["optimizer_state_dict"]
    # ZeRO-3 keeps the torch optimizer's state_dict under "optimizer_state_dict"; ZeRO-1/2
    # under "base_optimizer_state", as that state_dict or (elastic checkpoints) as the list of
    # per-group states.
    base = inner.get("optimizer_state_dict", inner.get("base_optimizer_state"))
    states = base["state"].values() if isinstance(base, dict) else base
    steps = {float(s["step"]) for s in states if "step" in s}
    return max(steps) if steps else 0.0


class _LazyTensors(Mapping[str, torch.Tensor]):
    """``{param name: whole tensor}`` read from ``zero/<name>/<file>`` on access (mmap)."""

    def __init__(self, zero_dir: Path, file: str, names: list[str],
                 shapes: Callable[[str], torch.Size]):
        self._zero, self._file, self._names, self._shapes = zero_dir, file, names, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._zero / name / self._file
        if not path.is_file():
            raise KeyError(name)
        value = weights_only_load(path, mmap=True)
        if isinstance(value, dict):  # ZeRO-1/2 conversions wrap the tensor: {"param": t, ...}
            value = value["param"]
        return value.reshape(self._shapes(name))

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names if (self._zero / n / self._file).is_file())

    def __len__(self) -> int:
        return sum(1 for _ in self)


def universal_state(folder: Path, shapes: Mapping[str, torch.Size], *, rank: int,
                    barrier: Callable[[], None]) -> dict[str, Any]:
    """The world-size-free state of the checkpoint in ``folder`` (an engine folder).

    A collective call. Rank 0 converts ``folder/state`` into ``folder/universal`` unless an
    earlier resume did; every rank then reads the same files.

    Args:
        folder: The engine folder given to ``TrainEngine.save_checkpoint``.
        shapes: Full shape of every trainable tensor of this model, by name.
        rank: This rank (0 converts).
        barrier: Waits for every rank.

    Returns:
        The mapping ``portable_state.pt`` holds: ``params``, ``exp_avg``, ``exp_avg_sq`` (each
        ``{name: tensor of shapes[name]}``, read on access), ``adam_step`` (float) and
        ``lr_scheduler`` (the scheduler's state_dict or None).
    """
    state_dir, out = folder / "state", folder / UNIVERSAL_DIR
    if rank == 0 and not out.is_dir():
        logger.info("converting %s to a universal checkpoint in %s", state_dir, out)
        convert(state_dir, out)
    # The other ranks wait here for the whole conversion: one longer than the process group's
    # timeout (torch's default 30 min; a 7B state is ~84 GB to read and write) fails them.
    barrier()
    names = list(shapes)
    data: dict[str, Any] = {key: _LazyTensors(out / "zero", file, names, shapes.__getitem__)
                            for key, file in _STATE_FILES.items()}
    data["adam_step"] = _adam_step(state_dir)
    model = weights_only_load(_rank0_file(state_dir, "_model_states.pt"), mmap=True)
    data["lr_scheduler"] = model.get("lr_scheduler")
    return data
