"""Test-only entry point: ``pcc-train`` with faults injected by monkeypatching, in the process
(or in every rank under torchrun) that trains. The product code has no fault hooks.

The faults come as JSON in ``PCC_TEST_FAULTS``:

* ``nan``: ``[{"step": s, "rank": r, "kind": "grad" | "loss"}, ...]``: at optimizer step s
  (1-based) rank r back-propagates NaN gradients while reporting a finite loss (``grad``), or
  reports a NaN loss while its gradients stay finite (``loss``).
* ``record``: a folder; after every step each rank appends ``{"step", "skipped", "digest"}``
  to ``rank<r>.jsonl`` there, digest = SHA-256 of its trainable weights gathered whole.
* ``kill_before_marker``: step s; the process SIGKILLs itself inside the save of step s, after
  the engine files, RNG and trainer state are written and before the COMPLETE marker.
* ``enospc_at``: step s; every ``torch.save`` into the checkpoint of step s writes onto
  ``/dev/full`` instead, a device that is always out of space: the real failure of a full disk
  (torch's zip writer raises RuntimeError, not OSError).
* ``free_bytes``: n; the output folder's file system reports n bytes free.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

import pcc_dist.checkpoint as checkpoint
import pcc_dist.checkpoint_manager as checkpoint_manager
import pcc_dist.engine as engine_mod
from pcc_dist.cli import train_main

FAULTS = json.loads(os.environ.get("PCC_TEST_FAULTS", "{}"))
RANK = int(os.environ.get("RANK", "0"))
_done_steps = [0]


def _digest(engine) -> str:
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    hasher = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for p in params:
            hasher.update(p.detach().float().cpu().numpy().tobytes())
    return hasher.hexdigest()


def _patch_nan() -> None:
    plan = {(f["step"], f["rank"]): f["kind"] for f in FAULTS.get("nan", [])}
    backward, step = engine_mod.TrainEngine.backward, engine_mod.TrainEngine.step

    def faulty_backward(self, loss, *, boundary, loss_value=None):
        kind = plan.get((_done_steps[0] + 1, RANK))
        if kind == "grad":
            loss = loss * float("nan")
        elif kind == "loss":
            loss_value = float("nan")
        return backward(self, loss, boundary=boundary, loss_value=loss_value)

    def recorded_step(self):
        result = step(self)
        _done_steps[0] += 1
        if "record" in FAULTS:
            digest = _digest(self)  # collective: every rank
            folder = Path(FAULTS["record"])
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{RANK}.jsonl", "a") as handle:
                handle.write(json.dumps({"step": _done_steps[0], "skipped": result.skipped,
                                         "digest": digest}) + "\n")
        return result

    engine_mod.TrainEngine.backward = faulty_backward
    engine_mod.TrainEngine.step = recorded_step


def _patch_kill() -> None:
    target = checkpoint_manager.step_name(FAULTS["kill_before_marker"])
    write = checkpoint_manager.fsync_write

    def dying_write(path, text):
        if path.name == checkpoint.COMPLETE_MARKER and path.parent.name.endswith(target):
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, text)

    checkpoint_manager.fsync_write = dying_write


def _patch_enospc() -> None:
    target = checkpoint_manager.step_name(FAULTS["enospc_at"])
    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and target in str(f):
            f = "/dev/full"
        return save(obj, f, *args, **kwargs)

    torch.save = full_disk_save


def _patch_free_space() -> None:
    import shutil

    usage = shutil.disk_usage

    def nearly_full(path):
        total, used, _ = usage(path)
        return type(usage(path))(total, used, FAULTS["free_bytes"])

    shutil.disk_usage = nearly_full


if __name__ == "__main__":
    if "nan" in FAULTS or "record" in FAULTS:
        _patch_nan()
    if "kill_before_marker" in FAULTS:
        _patch_kill()
    if "enospc_at" in FAULTS:
        _patch_enospc()
    if "free_bytes" in FAULTS:
        _patch_free_space()
    sys.exit(train_main(sys.argv[1:]))
