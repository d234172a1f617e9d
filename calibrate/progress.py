"""Progress bars for long phases (tqdm: count, rate and an ETA from the measured pace)."""

from __future__ import annotations

from typing import Any


class Progress:
    """tqdm bars keyed by phase; one line per phase. `progress(phase, done, total)` moves a phase's bar."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            # work resumed from a checkpoint starts the bar there, so the ETA counts only what is left
            bar = self.bars[phase] = tqdm(total=total, initial=done, desc=phase, leave=True, dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
