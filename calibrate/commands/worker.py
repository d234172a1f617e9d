"""`calibrate worker`: join a running study (any Optuna storage) and run its trials until its budget is reached."""

from __future__ import annotations

import argparse

ORDER = 50

EXAMPLES = """\
examples:
  # machine A starts the study (profile computed once, stored beside --out, trials recorded in the database)
  calibrate run --storage postgresql://user:pw@db-host/optuna --study-name smollm2-b0.3 --trials 200
  # machines B, C, ... join it; each reads settings and profile from the study, runs trials, and exits
  calibrate worker --storage postgresql://user:pw@db-host/optuna --study-name smollm2-b0.3
  # any machine writes the schedule(s) of the finished study
  calibrate export --storage postgresql://user:pw@db-host/optuna --study-name smollm2-b0.3 --out best.json

A worker killed mid-trial leaves that trial RUNNING until its heartbeat expires; the next worker to start a
trial marks it FAIL and re-queues its parameters, so the study still reaches its trial budget.
"""


def add_parser(subparsers):
    from ..options import THREADS_HELP

    p = subparsers.add_parser(
        "worker",
        help="join an existing study and run trials until its trial budget is reached",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--storage", required=True, help="Optuna storage URL of the study")
    p.add_argument("--study-name", required=True)
    p.add_argument("--device", help="override the study's device for this worker (cpu, cuda, auto)")
    p.add_argument("--device-map", help="override the study's device map for this worker (auto, balanced, JSON file)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Join a study: read its settings and profile from the storage, run trials until its budget is reached."""
    from ..data import CalibrationSet
    from ..models import load_model
    from ..options import set_threads
    from ..progress import Progress
    from ..study import Study, check_storage_exists

    set_threads(args.threads)
    check_storage_exists(args.storage)
    study = Study(args.storage, args.study_name)
    settings = study.settings
    if args.device:
        settings.device = args.device
    if args.device_map:
        settings.device_map = args.device_map
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.device_map)
    data = CalibrationSet(tokenizer, settings)
    progress = Progress()
    try:
        study.run(model, data, progress)
    finally:
        progress.close()
    print(f"worker: study '{args.study_name}' holds {study.finished()} finished trials (budget {study.trials})")
    return 0
