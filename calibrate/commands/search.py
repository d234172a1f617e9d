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

    job = steps.prepare(args, search=True)
    prof = require_profile(job.stem, job.settings)  # before the model loads: a wrong profile fails in seconds
    plan = steps.plan_search(args, job)
    model, data = steps.load(job)
    progress = Progress()
    try:
        steps.search_or_water_fill(plan, job, model, data, prof, progress)
    finally:
        progress.close()
    print(f"done in {time.time() - job.started:.0f} s")
    return 0
