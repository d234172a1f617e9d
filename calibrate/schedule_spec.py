"""Turn a command-line schedule spec into a Schedule for a given model.

A spec is a schedule file, or `KIND:BUDGET` for a reference shape at that mean KV fraction
(`uniform:0.3`, `pyramidkv:0.3`, `pyramidinfer:0.3`, `ones`).
"""

from __future__ import annotations

from pathlib import Path

from runtime.families import model_info
from runtime.reference import KINDS, at_budget
from runtime.schedule import Schedule, ScheduleError, load_schedule


def resolve_schedule(spec: str, model, prompt_tokens: int, **settings) -> Schedule:
    if Path(spec).suffix == ".json" or Path(spec).exists():
        return load_schedule(spec)
    kind, _, budget = spec.partition(":")
    kind = kind.lower().replace("-", "_")
    kind = "all_ones" if kind in ("ones", "full") else kind
    if kind not in KINDS:
        raise ScheduleError(
            f"schedule '{spec}' is neither a file nor KIND:BUDGET; use a .json file or one of "
            f"{', '.join(k + ':0.3' for k in KINDS if k != 'all_ones')}, ones"
        )
    if kind != "all_ones" and not budget:
        raise ScheduleError(f"schedule '{spec}' needs a budget, e.g. {kind}:0.3")
    info = model_info(model)
    return at_budget(
        kind,
        info.num_layers,
        float(budget or 1.0),
        prompt_tokens=prompt_tokens,
        model=info,
        **settings,
    )
