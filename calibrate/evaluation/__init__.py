"""Quality against KV memory on data calibration never saw: language modelling, LongBench-E and needle retrieval.

Every task prefills a prompt once with the full cache and, for each schedule, forks that cache and compresses it
(evict mode: the same tokens a prefill under the schedule would keep, see `Evaluator`); drop mode prefills under
the schedule itself. The result of every (sample, schedule) is a plain dict: a per-sample record.

    from calibrate import evaluation as ev
    from runtime.reference import at_budget
    task = ev.LongBenchTask(model, tok, ev.Settings())
    batch = task.samples("hotpotqa")
    prefix = task.prefix(batch)
    full = task.run_config(prefix, batch, None)  # None: the full cache
    uniform = task.run_config(prefix, batch, at_budget("uniform", 30, 0.3, prompt_tokens=prefix.tokens))

Prompts run in left-padded batches; the command (`calibrate eval`, through `run_task`) builds each reference
schedule at its batch's mean prompt length, so it keeps the budget there. What a task provides is written down in
`protocol`.

Modules: `config` (settings, columns), `methods` (which schedules), `batching` (prefill once, generate, score
answers), `protocol` (the task contract), `lm_task`, `longbench_task`, `needle_task`, `store` (results.json),
`runner` (`run_task`).
"""

from ..scoring import row_kv_fractions
from .batching import Prefix, answer_nll, batches_by_length, cut_at_eos, generate_after
from .config import TASKS, Config, EvalError, Settings
from .lm_task import LMTask
from .longbench_task import LongBenchTask, middle_truncate, pick_rows
from .methods import ScheduleMaker, make_configs
from .needle_task import NeedleTask, needle_correct
from .protocol import PromptSample, PromptTask, Record, Sample, Task, WindowTask
from .runner import run_task, units
from .store import Store

__all__ = [
    "TASKS",
    "Config",
    "EvalError",
    "LMTask",
    "LongBenchTask",
    "NeedleTask",
    "Prefix",
    "PromptSample",
    "PromptTask",
    "Record",
    "Sample",
    "ScheduleMaker",
    "Settings",
    "Store",
    "Task",
    "WindowTask",
    "answer_nll",
    "batches_by_length",
    "cut_at_eos",
    "generate_after",
    "make_configs",
    "middle_truncate",
    "needle_correct",
    "pick_rows",
    "row_kv_fractions",
    "run_task",
    "units",
]
