"""Progress bars for long phases (tqdm: count, rate and an ETA from the measured pace)."""

from __future__ import annotations

import time
from typing import Any

# where units differ in cost (`work`): the count, then an ETA from the measured pace per unit of work
WORK_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
_clock = time.perf_counter  # the pace's clock (a test sets it)


class Progress:
    """tqdm bars keyed by phase; one line per phase. `progress(phase, done, total)` moves a phase's bar."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}
        self.started: dict[str, tuple[float, float]] = {}  # phase: (clock, work done) when its bar was made

    def __call__(
        self, phase: str, done: int, total: int | None = None, work: tuple[float, float] | None = None
    ) -> None:
        """`work` (done, total): the phase's units cost unequally (e.g. a deeper layer's curve is cheaper); the ETA
        then follows the work left instead of the count left."""
        from tqdm.auto import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            # work resumed from a checkpoint starts the bar there, so the ETA counts only what is left
            fmt = {"bar_format": WORK_FORMAT} if work is not None else {}
            bar = self.bars[phase] = tqdm(total=total, initial=done, desc=phase, leave=True, dynamic_ncols=True, **fmt)
            self.started[phase] = (_clock(), work[0] if work else 0.0)
        bar.n = done
        if work is not None:
            bar.set_postfix_str(eta(self.started[phase], _clock(), *work), refresh=False)
        bar.refresh()
        if total is not None and done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def eta(start: tuple[float, float], now: float, done: float, total: float) -> str:
    """The postfix "about M:SS left" from the pace since `start` (clock, work done then), or "" before any work
    was timed (tqdm puts the comma before it)."""
    clock, done_then = start
    if done <= done_then or now <= clock:
        return ""
    left = (now - clock) / (done - done_then) * max(total - done, 0.0)
    return f"about {int(left // 60)}:{int(left % 60):02d} left"
