"""Wall time for one study to reach N trials with 1, 2 and 3 local workers sharing it through a database.

    PG=$(bash .ci/postgres.sh | tail -n 1)
    python -m experiments.worker_speedup --storage "$PG" [--workers 1 2 3] [--trials 24] \\
        [--model PATH] [--data ../shared/data/tinyshakespeare] [--context-length 512]

For every worker count a fresh study is calibrated with `calibrate run --quick` (which computes the profile once
and reuses it for the later counts, since the settings match) while `calibrate worker` processes join it; the time
counted runs from the moment the study exists (profile stored) until every process has exited with N trials
finished. Each process gets cores / workers torch threads. Only ratios measured in one run are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from calibrate.paths import shared_data
from runtime.schedule import write_atomic


def _study_ready(storage, name: str) -> bool:
    import optuna

    for s in optuna.get_all_study_summaries(storage):
        if s.study_name == name and "profile" in s.user_attrs:
            return True
    return False


def time_workers(workers: int, args, out: Path) -> dict:
    import optuna

    name = f"speedup-{workers}-{uuid.uuid4().hex[:6]}"
    # each process gets its share of the cores: oversubscribed torch threads slow every worker down
    threads = max(1, (os.cpu_count() or 1) // workers)
    common = ["--storage", args.storage, "--study-name", name, "--threads", str(threads)]
    run = [sys.executable, "-m", "calibrate", "run", "--quick", "--trials", str(args.trials), "--out", str(out)]
    run += ["--context-length", str(args.context_length), "--data", *args.data, *common]
    if args.model:
        run += ["--model", args.model]
    procs = [subprocess.Popen(run, stdout=subprocess.DEVNULL)]
    storage = optuna.storages.RDBStorage(args.storage)
    while not _study_ready(storage, name):
        if procs[0].poll() is not None:
            raise SystemExit(f"calibrate run exited with {procs[0].returncode} before the study was created")
        time.sleep(0.2)
    start = time.perf_counter()
    worker = [sys.executable, "-m", "calibrate", "worker", *common]
    procs += [subprocess.Popen(worker, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a process failed: exit codes {codes}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    return {"workers": workers, "wall_seconds": wall, "complete_trials": done, "study": name}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", required=True, help="a database URL the workers share (PostgreSQL)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--model")
    p.add_argument("--data", nargs="+", default=[str(shared_data() / "tinyshakespeare")])
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--out", help="also write the results as JSON")
    args = p.parse_args(argv)
    if min(args.workers) < 1 or args.trials < 1:
        raise SystemExit("--workers and --trials must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speedup.json"  # the profile lands beside it and is reused by every worker count
        print(f"{args.trials} trials per study, calibrate run --quick --context-length {args.context_length}")
        print("| workers | wall s (study created -> N trials) | speed-up |\n|---|---|---|")
        for k in args.workers:
            row = time_workers(k, args, out)
            row["speedup"] = rows[0]["wall_seconds"] / row["wall_seconds"] if rows else 1.0
            rows.append(row)
            print(f"| {k} | {row['wall_seconds']:.1f} | {row['speedup']:.2f}x |", flush=True)
    if args.out:
        write_atomic(args.out, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
