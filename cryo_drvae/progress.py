"""Progress on a terminal: tqdm bars that draw there (none in RELION's run.out), and time-left
estimates for stages whose steps cost unequal amounts (class growing). Modules import
``bar as tqdm`` from here.

>>> clock = WorkClock([1, 2, 4, 8])          # work of each step, e.g. classes per growth stage
>>> clock.step_done(0); clock.seconds_left() # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

#: Size bars assume when the terminal reports none: tqdm takes 0 rows to mean "no room" and
#: 0 columns as the bar width, and so drew nothing at all.
FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24


def terminal_size(stream: TextIO) -> tuple[int, int] | None:
    """``(columns, rows)`` of the terminal ``stream`` writes to; None when it is not a terminal."""
    try:
        if not stream.isatty():
            return None
        size = os.get_terminal_size(stream.fileno())
        return size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        return None


def bar(iterable=None, **kwargs):
    """A tqdm bar (``tqdm.auto``) that draws on a terminal and nowhere else (``disable=None``: not
    in RELION's run.out), also on a terminal that reports 0 columns (``script``, ``docker exec``
    without a size, some IDE consoles), where tqdm drew nothing."""
    from tqdm.auto import tqdm
    kwargs.setdefault("disable", None)
    size = terminal_size(kwargs.get("file") or sys.stderr)
    if size is not None:
        if size[0] == 0:
            kwargs.setdefault("ncols", FALLBACK_COLUMNS)
        if size[1] == 0:
            kwargs.setdefault("nrows", FALLBACK_ROWS)
    return tqdm(iterable, **kwargs)


class WorkClock:
    """Seconds left: the work of the steps still to come at the pace of the last finished step.

    The last step's pace, not the average since the start: in class growing the cost per class
    rises with the number of classes (more templates than the caches hold), so the average of the
    early, cheap steps would promise too little.
    """

    def __init__(self, work: Sequence[float]) -> None:
        self.work = [float(w) for w in work]
        self.done = 0.0
        self.last_time = time.perf_counter()
        self.pace: float | None = None       # seconds per unit of work, of the last step

    @property
    def total(self) -> float:
        return sum(self.work)

    def step_done(self, index: int) -> None:
        """Step ``index`` has finished (steps finish in order)."""
        now = time.perf_counter()
        done = sum(self.work[:index + 1])
        if done > self.done:
            self.pace = (now - self.last_time) / (done - self.done)
        self.done, self.last_time = done, now

    def seconds_left(self) -> float | None:
        """Estimated seconds to finish all steps; None before the first has finished."""
        if self.pace is None:
            return None
        return self.pace * max(0.0, self.total - self.done)


def format_seconds(seconds: float | None) -> str:
    """``'about 3 min left'`` style text; empty when unknown."""
    if seconds is None:
        return ""
    if seconds < 90:
        return f"about {seconds:.0f} s left"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min left"
    return f"about {seconds / 3600:.1f} h left"
