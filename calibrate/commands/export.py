"""`calibrate export`: write the best schedule(s) of a study from its storage (no model run needed)."""

from __future__ import annotations

import argparse

ORDER = 60

EXAMPLES = """\
examples:
  calibrate export --storage sqlite:///schedules/smollm2-135m-instruct_b0.3.optuna.db \\
      --study-name smollm2-135m-instruct_b0.3_1a2b3c4d5e6f --out /tmp/best.json
  calibrate export --storage postgresql://user:pw@db-host/optuna --study-name smollm2-multi --out schedules/s.json
"""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export",
        help="write the best schedule(s) of a study",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--storage", required=True, help="Optuna storage URL of the study")
    p.add_argument("--study-name", required=True)
    p.add_argument("--out", help="schedule file (default: the --out the study was started with)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..settings import budget_out, check_writable
    from ..study import Study, check_storage_exists

    check_storage_exists(args.storage)
    study = Study(args.storage, args.study_name)
    out = Path(args.out) if args.out else study.out
    for b in study.budgets:
        check_writable(budget_out(out, b, study.multi))
    study.export(out)
    return 0
