"""Run a task over every config, computing only what the store still lacks (see `protocol` for the contract)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import metrics
from .config import Config
from .methods import ScheduleMaker
from .protocol import PromptTask, Task, WindowTask
from .store import Store


def group_fields(task: str, group: str) -> dict[str, Any]:
    """What a results record says about its group, besides the group name."""
    if task == "lm":
        return {"dataset": group}
    if task == "longbench":
        return {"dataset": group, "metric": metrics.DATASET_METRIC[group]}
    question, length, depth = group.split("|")
    return {"dataset": "gutenberg", "question": question, "length": int(length), "depth": int(depth)}


def run_task(
    task: Task,
    configs: Sequence[Config],
    maker: ScheduleMaker,
    store: Store,
    batch_size: int = 8,
    progress: Callable[[str, int], Any] | None = None,
) -> int:
    """Compute every missing (sample, config) of a task, saving after each; returns how many were computed.

    A `PromptTask` runs in batches (prefilled once, then every config forks the batch's cache); a batch runs the
    configs that any of its samples still lacks, and only the missing results are stored. A `WindowTask` runs
    each config that lacks any sample, whole. `progress(what, results_added)` follows along.
    """
    if isinstance(task, WindowTask):
        return _run_windows(task, configs, maker, store, progress)
    if isinstance(task, PromptTask):
        return _run_prompts(task, configs, maker, store, batch_size, progress)
    raise TypeError(f"{type(task).__name__} is neither a PromptTask nor a WindowTask")


def _run_windows(task: WindowTask, configs, maker: ScheduleMaker, store: Store, progress) -> int:
    computed = 0
    name = task.name
    (group,) = task.groups()
    ids = [s.id for s in task.samples(group)]
    qw = maker.query_window(configs, task.prompt_tokens)
    for config in configs:
        if all(store.has(name, group, config, i) for i in ids):
            continue
        t0 = time.perf_counter()
        records = task.run_all(maker.schedule(config, task.prompt_tokens), query_window=qw)
        for rec in records:  # the first config also pays the prefill of every window
            rec["seconds"] = round((time.perf_counter() - t0) / max(len(records), 1), 3)
        store.add(name, group, config, group_fields(name, group), records, ids)
        store.save()
        computed += len(records)
        if progress:
            progress(config.key, len(records))
    return computed


def _run_prompts(task: PromptTask, configs, maker: ScheduleMaker, store: Store, batch_size: int, progress) -> int:
    computed = 0
    name = task.name
    group_of: dict[int, str] = {}
    expected: dict[str, list[str]] = {}
    pending = []
    for group in task.groups():
        samples = task.samples(group)
        expected[group] = [s.id for s in samples]
        for smp in samples:
            group_of[id(smp)] = group
            if any(not store.has(name, group, c, smp.id) for c in configs):
                pending.append(smp)
    for batch in task.batches(pending, batch_size):
        groups = [group_of[id(smp)] for smp in batch]
        todo = [c for c in configs if any(not store.has(name, g, c, smp.id) for g, smp in zip(groups, batch))]
        n = round(sum(x.prompt_tokens for x in batch) / len(batch))  # references are built at the mean length
        prefix = task.prefix(batch, maker.query_window(todo, n))
        t0 = time.perf_counter()
        if any(c.mode == "evict" or c.is_full for c in todo):  # drop mode prefills under each schedule instead
            prefix.full()
        prefill = (time.perf_counter() - t0) / len(batch)
        for config in todo:
            t0 = time.perf_counter()
            records = task.run_config(prefix, batch, maker.schedule(config, prefix.tokens))
            seconds = (time.perf_counter() - t0) / len(batch)
            added = 0
            for g, smp, rec in zip(groups, batch, records):
                rec.update(seconds=round(seconds, 3), prefill_seconds=round(prefill, 3), batch=len(batch))
                if not store.has(name, g, config, smp.id):
                    store.add(name, g, config, {**group_fields(name, g), "sample_ids": expected[g]}, [rec], expected[g])
                    added += 1
            store.save()
            computed += added
            if progress:
                progress(groups[0], added)
    return computed


def units(task: Task, configs: Sequence[Config], store: Store) -> tuple[int, int]:
    """(missing, total) (sample, config) pairs of a task, for progress bars."""
    total = missing = 0
    for group in task.groups():
        for s in task.samples(group):
            for c in configs:
                total += 1
                missing += not store.has(task.name, group, c, s.id)
    return missing, total
