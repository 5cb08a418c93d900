"""Progress of long loops: a tqdm bar at a terminal, an INFO line every minute anywhere else.

Jobs under slurm, nohup or CI have no terminal, and a bar written into their log is unreadable;
without a fallback a long loop there (an STS7 evaluation on a CPU) says nothing until it ends.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

logger = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 60.0


def progress_enabled() -> bool:
    """Progress bars are for humans: off when stderr is not a TTY or a ``CI`` variable is set."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty()


class LogProgress:
    """tqdm's ``update``/``close`` interface, reported as log lines.

    A line ``"<desc>: done/total <unit> (rate <unit>/s, about T left)"`` is logged when at
    least ``every`` seconds have passed since the previous one (the first after ``every``
    seconds); none once the loop is done, so a short loop logs nothing.
    """

    def __init__(self, total: int, desc: str, unit: str, every: float = LOG_EVERY_SECONDS):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.every or self.done >= self.total:
            return
        self._last = now
        rate = self.done / max(now - self._start, 1e-9)
        left = (self.total - self.done) / rate
        left_text = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min"
        logger.info("%s: %d/%d %s (%.1f %s/s, about %s left)", self.desc, self.done,
                    self.total, self.unit, rate, self.unit, left_text)

    def close(self) -> None:
        """Nothing to release; present so callers treat this and a tqdm bar alike."""

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, show: bool):
    """A progress reporter for a loop of ``total`` units.

    Args:
        total: Units the loop will process.
        desc: What the loop does ("embed").
        unit: What one unit is ("sent").
        show: False = silent (timed benchmarks, internal calls); True = a tqdm bar when
            :func:`progress_enabled`, else :class:`LogProgress` lines every minute.

    Returns:
        An object with ``update(n)``, ``close()`` and context-manager support.
    """
    if show and progress_enabled():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return LogProgress(total, desc, unit, every=LOG_EVERY_SECONDS if show else math.inf)


def step_progress(total: int, initial: int, desc: str, show: bool):
    """The training loop's bar of ``total`` steps, starting at ``initial`` (a resumed stage).

    Only a tqdm bar (``show`` = rank 0 and :func:`progress_enabled`): without one the step log
    writes a line per logged step instead (:mod:`pcc_dist.step_log`).
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not show)
