"""Which schedules are evaluated: the columns (`make_configs`) and each column's schedule at a prompt length
(`ScheduleMaker`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.families import model_info
from runtime.reference import at_budget
from runtime.schedule import Schedule, ScheduleError, Selection, load_schedule

from .config import METHODS, MODES, REFERENCE_KIND, SELECTION_BASELINES, Config, EvalError


def file_label(path: str | Path, schedule: Schedule) -> str:
    return schedule.name or Path(path).stem


def schedule_digest(schedule: Schedule, settings_only: bool = False) -> str:
    """Hash of what a schedule does (not its provenance); `settings_only`: without ratios, budget and name,
    which is what the reference methods borrow from the first calibrated schedule."""
    drop = {"provenance", "ratios", "budget", "name", "context_length"} if settings_only else {"provenance"}
    body = {k: v for k, v in schedule.to_dict().items() if k not in drop}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def schedule_budget(schedule: Schedule) -> float:
    b = schedule.budget if schedule.budget is not None else schedule.kv_fraction(schedule.context_length)
    return round(float(b), 4)


def make_configs(
    methods: Sequence[str], budgets: Sequence[float], modes: Sequence[str], files: Sequence[str] = ()
) -> list[Config]:
    """Full cache once; each reference method at each budget and mode; each schedule file at its own budget.

    A schedule file's budget joins the budgets, so the references are also built at it.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvalError(f"unknown method '{unknown[0]}'; use some of {', '.join(METHODS)}")
    for m in modes:
        if m not in MODES:
            raise EvalError(f"unknown prefill mode '{m}'; use evict, drop or evict,drop")
    for b in budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0.0 < b <= 1.0):
            raise EvalError(f"budget {b} is outside (0, 1]; give mean KV fractions such as 0.2,0.3,0.5")
    loaded = [(path, load_schedule(path)) for path in files]
    all_budgets = sorted({round(float(b), 4) for b in budgets} | {schedule_budget(s) for _, s in loaded})
    configs: list[Config] = []
    if "full" in methods:
        configs.append(Config("full", 1.0, "evict"))
    borrowed = schedule_digest(loaded[0][1], settings_only=True) if loaded else ""  # see ScheduleMaker
    for mode in modes:
        for b in all_budgets:
            configs += [Config(m, b, mode, digest=borrowed) for m in methods if m != "full" and b < 1.0]
        for path, schedule in loaded:
            label, budget = file_label(path, schedule), schedule_budget(schedule)
            configs.append(Config(label, budget, mode, str(path), schedule_digest(schedule)))
    keys = [c.key for c in configs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise EvalError(f"two schedules share the label '{dup}'; give the files different names")
    return configs


class ScheduleMaker:
    """Builds each config's schedule for a prompt length (references exactly at the budget at that length).

    Reference methods take their sinks, window, selection and decode settings from `base` (the first calibrated
    schedule, so only the allocation differs), or the Schedule defaults.
    """

    def __init__(self, model, base: Schedule | None = None):
        self.info = model_info(model)
        self.layers = self.info.num_layers
        self.base = base
        self._cache: dict[tuple[str, int], Schedule | None] = {}
        self._files: dict[str, Schedule] = {}

    def settings(self) -> dict[str, Any]:
        if self.base is None:
            return {}
        b = self.base
        return dict(
            sinks=b.sinks,
            window=b.window,
            selection=dataclasses.replace(b.selection),
            decode=dataclasses.replace(b.decode),
        )

    def schedule(self, config: Config, prompt_tokens: int) -> Schedule | None:
        """`config`'s schedule at `prompt_tokens` (None for the full cache)."""
        key = (config.key, prompt_tokens)
        if key not in self._cache:
            self._cache[key] = self._build(config, prompt_tokens)
        return self._cache[key]

    def query_window(self, configs: Sequence[Config], prompt_tokens: int) -> int:
        """The probe's query window that every config's schedule at `prompt_tokens` fits in (at least 64)."""
        schedules = [self.schedule(c, prompt_tokens) for c in configs]
        return max([64] + [s.window for s in schedules if s is not None])

    def _build(self, config: Config, n: int) -> Schedule | None:
        if config.is_full:
            return None
        if config.path is not None:
            if config.path not in self._files:
                self._files[config.path] = load_schedule(config.path)
            s = self._files[config.path]
            return dataclasses.replace(s, prefill_mode=config.mode)
        kw = self.settings()
        kw["model"] = self.info
        kw["prefill_mode"] = config.mode
        kw["name"] = config.method
        if config.method in SELECTION_BASELINES:
            selection = kw.get("selection") or Selection()
            kw["selection"] = dataclasses.replace(selection, method=SELECTION_BASELINES[config.method])
            kind = "uniform"
        else:
            kind = REFERENCE_KIND[config.method]
        try:
            return at_budget(kind, self.layers, config.budget, prompt_tokens=n, **kw)
        except ScheduleError as e:
            raise EvalError(f"{config.key} at {n} prompt tokens: {e}") from None
