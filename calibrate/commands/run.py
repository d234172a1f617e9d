"""`calibrate run`: profile the model on sample data, search schedules under a KV budget, write a schedule file."""

from __future__ import annotations

import argparse

ORDER = 10

EXAMPLES = """\
examples:
  calibrate run                                   # embedded SmolLM2, generated tasks, budget 0.3
  calibrate run --quick                           # a small preset (under 90 s on 2 cores, per-head curves estimated)
  calibrate run --head-curves fisher              # per-head curves estimated, not measured (docs/method.md)
  calibrate run --data ../shared/data/gutenberg ../shared/data/tinyshakespeare --budget 0.2
  calibrate run --budgets 0.2,0.3,0.5 --trials 60 # one study, NSGA-II, one schedule per budget
  calibrate run --model gemma3-270m --out schedules/gemma3-270m_b0.3.json
  calibrate run --storage sqlite:///runs/study.db --study-name mine   # run again to resume it
  calibrate run --out runs/new.json --warm-start schedules/old_b0.3.json   # recalibrate, old best tried too

The profile (attention consistency and per-layer sensitivity) is saved beside the schedule and reused when
the settings match; the Optuna study lives in --storage (default: an SQLite file beside the schedule), so the
same command resumes an interrupted search without losing finished trials.
"""


def add_parser(subparsers):
    from ..options import add_calibration_args, add_profile_workers_arg, add_search_args

    p = subparsers.add_parser(
        "run",
        help="calibrate a schedule: profile, search under a KV budget, write the schedule file",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_calibration_args(p)
    add_profile_workers_arg(p)
    add_search_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import time

    from .. import job as steps
    from ..profile_store import load_or_measure
    from ..progress import Progress

    job = steps.prepare(args, search=True)
    plan = steps.plan_search(args, job)
    model, data = steps.load(job)
    progress = Progress()
    try:
        prof = load_or_measure(model, job.settings, data, job.stem, progress)
        progress.close()
        print(prof.table())
        print(f"profile: {job.stem}.profile.json / .profile.safetensors")
        steps.search_or_water_fill(plan, job, model, data, prof, progress)
    finally:
        progress.close()
    print(f"done in {time.time() - job.started:.0f} s")
    return 0
