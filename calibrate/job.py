"""The steps that `calibrate run`, `profile` and `search` are made of: check the inputs (creating nothing), load
the model and data, search a study or water-fill, and write the schedule(s)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import provenance
from . import settings as st
from .errors import CalibrateError
from .options import set_threads


@dataclass
class Job:
    """A calibration command's checked inputs."""

    settings: st.Settings
    budgets: list[float]
    out: Path
    label: str
    started: float = field(default_factory=time.time)

    @property
    def stem(self) -> Path:
        return st.profile_stem(self.out)

    @property
    def outputs(self) -> list[Path]:
        return [st.budget_out(self.out, b, len(self.budgets) > 1) for b in self.budgets]


def prepare(args, search: bool) -> Job:
    """Check everything that can be checked without the model; nothing is created on disk."""
    from .models import model_name

    settings = st.from_args(args)
    set_threads(args.threads)
    budgets = st.budgets_from_args(args) if search else [0.3]
    for b in budgets:
        st.check_budget(b, settings)
    label = model_name(settings.model)
    job = Job(settings, budgets, Path(args.out) if args.out else st.default_out(label, budgets), label)
    for path in job.outputs if search else [job.out]:
        st.check_writable(path)
    return job


@dataclass
class SearchPlan:
    """What `run` and `search` do after the profile: a study (storage, trials, warm start) or a water-fill."""

    storage: str | None  # None: --no-search
    study_name: str | None
    trials: int
    warm: list[dict[str, Any]]


def plan_search(args, job: Job) -> SearchPlan:
    """Check the search options before any compute; an SQLite storage is not created yet."""
    from .study import check_storage, storage_url

    storage = None if args.no_search else storage_url(args.storage, job.out)
    if storage:
        check_storage(storage)
    warm = [] if args.no_search else warm_start_params(args.warm_start)
    return SearchPlan(storage, args.study_name, trials_from_args(args), warm)


def search_or_water_fill(plan: SearchPlan, job: Job, model, data, prof, progress) -> list[Path]:
    if plan.storage is None:
        from runtime.families import model_info

        return water_fill(job, prof, model_info(model, name=job.label), data)
    return search_and_export(job, model, data, prof, plan, progress)


def trials_from_args(args) -> int:
    trials = (12 if args.quick else 40) if args.trials is None else args.trials
    if trials < 1:
        raise CalibrateError(f"--trials {trials}: a study needs at least 1 trial")
    return trials


def warm_start_params(paths: list[str] | None) -> list[dict[str, Any]]:
    """The search parameters recorded in earlier schedule files, less their budget (a shape fits any budget)."""
    from runtime.schedule import load_schedule

    out = []
    for path in paths or []:
        params = load_schedule(path).provenance.get("params")
        if not isinstance(params, dict) or "shape" not in params:
            raise CalibrateError(
                f"--warm-start {path}: the file records no search parameters (provenance.params); "
                "give a schedule written by 'calibrate run' or 'calibrate search'"
            )
        out.append({k: v for k, v in params.items() if k != "budget"})
    return out


def load(job: Job):
    """The model (checked: a supported family, windows within its positions) and the calibration data."""
    from runtime.families import check_supported

    from .data import CalibrationSet
    from .models import load_model

    s = job.settings
    model, tokenizer = load_model(s.model, s.dtype, s.device, s.device_map)
    check_supported(model)
    st.check_positions(model, s.context_length + s.continuation, f"--context-length {s.context_length} + "
                       f"{s.continuation} continuation tokens", "use a shorter --context-length")  # fmt: skip
    return model, CalibrationSet(tokenizer, s)


def search_and_export(job: Job, model, data, prof, plan: SearchPlan, progress) -> list[Path]:
    """Start (or resume) the study, run it to its trial budget, write the best schedule per budget.

    A study database this call created is removed again if it fails before any trial finished."""
    from runtime.families import model_info

    from .study import Study, sqlite_file, study_name_for

    storage = plan.storage
    db = sqlite_file(storage)
    fresh = db is not None and not db.exists()
    study = None
    try:
        name = plan.study_name or study_name_for(job.label, job.budgets, job.settings)
        info = model_info(model, name=job.label)
        study = Study.start(storage, name, job.settings, job.budgets, plan.trials, job.out, info, job.stem, data,
                            plan.warm, heads=prof.head_parts is not None)  # fmt: skip
        study.run(model, data, progress)
    except BaseException:
        if fresh and db.exists() and (study is None or study.finished() == 0):
            db.unlink()
        raise
    progress.close()
    return study.export(job.out, job.started)


def water_fill(job: Job, prof, info, data) -> list[Path]:
    """`--no-search`: the sensitivity allocation at each budget, default selection, no validation scoring."""
    from runtime.schedule import Selection

    from . import search_space as s

    written = []
    settings = job.settings
    for b, path in zip(job.budgets, job.outputs):
        space = s.Space(b, settings.context_length, prof, info, settings.sinks, [settings.window], settings.window)
        kind = s.HEADS if s.HEADS in space.shapes else "sensitivity"
        schedule = space.build(kind, settings.window, {"exponent": 1.0, "mix": 0.0}, Selection())
        unit = "KV head" if kind == s.HEADS else "layer"
        record = provenance.water_filled(unit, settings, data.describe(), prof, schedule, job.started)
        schedule.with_ratios(schedule.ratios, name=f"{info.name}_b{b:g}", provenance=record, budget=b).save(path)
        written.append(path)
        print(f"wrote {path} (water-filled, KV fraction {schedule.kv_fraction():.3f})")
    return written
