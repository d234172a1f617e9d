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
    from ..pipeline import add_common_args

    p = subparsers.add_parser(
        "profile",
        help="measure the per-layer profile (attention recall, sensitivity) only",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..pipeline import run_command

    return run_command(args, do_profile=True, do_search=False)
