"""`calibrate profile`: measure attention consistency and per-layer sensitivity, and save the profile."""

from __future__ import annotations

import argparse

ORDER = 20

EXAMPLES = """\
examples:
  calibrate profile --quick
  calibrate profile --data ../shared/data/tinyshakespeare --out schedules/smollm2_b0.3.json
  calibrate profile --model gemma3-270m --context-length 2048

Writes OUT-without-.json + .profile.json (summary) and .profile.safetensors (tensors), beside the schedule a
later 'calibrate search' with the same --out will write.
"""


def add_parser(subparsers):
    from ..options import add_calibration_args, add_profile_workers_arg

    p = subparsers.add_parser(
        "profile",
        help="measure the per-layer profile (attention recall, sensitivity) only",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_calibration_args(p)
    add_profile_workers_arg(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import time

    from .. import job as steps
    from ..profile_store import load_or_measure
    from ..progress import Progress

    job = steps.prepare(args, search=False)
    model, data = steps.load(job)
    progress = Progress()
    try:
        prof = load_or_measure(model, job.settings, data, job.stem, progress)
    finally:
        progress.close()
    print(prof.table())
    print(f"profile: {job.stem}.profile.json / .profile.safetensors")
    print(f"done in {time.time() - job.started:.0f} s")
    return 0
