"""`calibrate search`: search schedules over an existing profile (from `calibrate profile` or `run`)."""

from __future__ import annotations

import argparse

ORDER = 30

EXAMPLES = """\
examples:
  calibrate search --quick --out schedules/smollm2_b0.3.json
  calibrate search --budget 0.2 --trials 80 --out schedules/smollm2_b0.2.json
  calibrate search --budgets 0.2,0.3,0.5 --storage sqlite:///runs/multi.db --study-name smollm2-multi

Reads the profile saved beside --out; give the same data and settings as the profile was measured with.
"""


def add_parser(subparsers):
    from ..options import add_calibration_args, add_search_args

    p = subparsers.add_parser(
        "search",
        help="search schedules with Optuna over an existing profile",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_calibration_args(p)
    add_search_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import time

    from .. import job as steps
    from ..profile_store import require_profile
    from ..progress import Progress
    from ..study import check_storage, storage_url

    job = steps.prepare(args, search=True)
    prof = require_profile(job.stem, job.settings)  # before the model loads: a wrong profile fails in seconds
    storage = None if args.no_search else storage_url(args.storage, job.out)
    if storage:
        check_storage(storage)
    warm = [] if args.no_search else steps.warm_start_params(args.warm_start)
    trials = steps.trials_from_args(args)
    model, data = steps.load(job)
    progress = Progress()
    try:
        if args.no_search:
            from runtime.families import model_info

            steps.water_fill(job, prof, model_info(model, name=job.label), data)
        else:
            steps.search_and_export(job, model, data, prof, storage, args.study_name, trials, warm, progress)
    finally:
        progress.close()
    print(f"done in {time.time() - job.started:.0f} s")
    return 0
