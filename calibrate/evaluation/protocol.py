"""What `run_task` needs from a task: the contract every evaluation task implements.

A task turns its data into samples, sorted into groups (one results record per task, group and config), and
computes per-sample records for a schedule. It comes in one of two shapes:

- `PromptTask` (LongBench, needles): prompts of any length. `run_task` cuts the samples that still lack a result
  into batches with `batches`, prefills each batch once with `prefix`, then calls `run_config` for every config
  the batch lacks (evict mode forks the batch's full cache; drop mode prefills under the schedule itself).
- `WindowTask` (language modelling): samples of one fixed prompt length, scored in one `run_all` call per
  schedule; the task batches them itself (through `Evaluator`).

A record is a plain JSON-able dict: "id" (the sample's id), "kv_fraction" (measured, see `row_kv_fractions`),
the task's quality fields (listed in `STATS` for aggregation) and anything else worth keeping (predictions,
prompt lengths). `run_task` adds the timings.

To add a task: give it a name in `TASKS`, its sizes to `Settings` (and to `Settings.task_settings` those its
results depend on, so a resumed run refuses other values), its quality fields to `STATS`, its record fields to
`group_fields`, and build it in `calibrate/commands/eval.py` (which also checks its data folder). A prompt task
that answers greedily can build on `batching.GreedyPromptTask` (EOS and pad tokens, `Prefix`, decoded answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from runtime.schedule import Schedule

from .batching import Prefix

Record = dict[str, Any]


class Sample(Protocol):
    """One prompt (or window) of a task."""

    @property
    def id(self) -> str:
        """Unique within its group; results are stored and resumed by it, so it must not change between runs."""
        ...


class PromptSample(Sample, Protocol):
    @property
    def prompt_tokens(self) -> int:
        """Tokens prefilled: reference schedules are built at a batch's mean prompt length."""
        ...


class Task(Protocol):
    name: str  # one of TASKS: the results' "task" field, and the key of STATS and Settings.task_settings

    def groups(self) -> list[str]:
        """The groups (datasets, needle cells) in reporting order; each holds its own results records."""
        ...

    def samples(self, group: str) -> Sequence[Sample]:
        """The group's samples, the same on every call and in every run (seeded, never shuffled by time)."""
        ...


@runtime_checkable
class PromptTask(Task, Protocol):
    """Prompts of any length, batched by `run_task`: prefilled once per batch, forked per schedule."""

    def samples(self, group: str) -> Sequence[PromptSample]: ...

    def batches(self, samples: Sequence[PromptSample], size: int) -> list[list[PromptSample]]:
        """`samples` (from any groups) cut into batches of at most `size` that run together: left-padded to one
        width, so keep lengths close (see `batches_by_length`)."""
        ...

    def prefix(self, batch: Sequence[PromptSample], query_window: int = 64) -> Prefix:
        """The batch's prompts as a `Prefix`, not prefilled yet (`run_task` calls `Prefix.full` when a config
        needs it). `query_window`: the recent queries the full cache keeps, at least every schedule's window."""
        ...

    def run_config(self, prefix: Prefix, batch: Sequence[PromptSample], schedule: Schedule | None) -> list[Record]:
        """One record per sample of `batch`, in order, under `schedule` (None: the full cache). Start from
        `prefix.compressed(schedule)`, which gives each call its own cache: never change the prefix's."""
        ...


@runtime_checkable
class WindowTask(Task, Protocol):
    """Samples of one prompt length, all scored in one call per schedule; a single group."""

    @property
    def prompt_tokens(self) -> int:
        """Every sample's prompt length (the reference schedules are built at it)."""
        ...

    def run_all(self, schedule: Schedule | None, query_window: int = 64) -> list[Record]:
        """One record per sample under `schedule` (None: the full cache), in the order of `samples`.
        `query_window` as in `PromptTask.prefix`."""
        ...
