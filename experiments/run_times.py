"""Wall time of `calibrate run` under several option sets, side by side: the runs alternate, round after round,
each in a fresh output folder (so no profile or study is reused), one at a time.

    python -m experiments.run_times [--rounds 2] [--out docs/results/run_times_smollm2.json] \\
        [--config NAME='OPTIONS' ...]

The default option sets are the quick preset's: `--quick` (24 gradient samples per batch), `--quick
--fisher-samples 48` and `--quick --head-curves measured`. For each run: the wall time of the whole command and
the profile's own `seconds` (its meta); then per set the median over rounds and the ratio of medians to the first
set's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.schedule import write_atomic

from . import check_out

DEFAULT = {
    "quick": "--quick",
    "quick-48": "--quick --fisher-samples 48",
    "quick-measured": "--quick --head-curves measured",
}


def _config(text: str) -> tuple[str, str]:
    name, sep, options = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--config '{text}' is not NAME='OPTIONS', e.g. fisher='--head-curves fisher'")
    return name, options


def time_run(options: str, folder: Path) -> dict:
    """One `calibrate run OPTIONS --out FOLDER/s.json`: its wall seconds and its profile's."""
    out = folder / "s.json"
    cmd = [sys.executable, "-m", "calibrate", "run", *shlex.split(options), "--out", str(out)]
    t = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"error: {shlex.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    meta = json.loads(out.with_suffix(".profile.json").read_text())["meta"]
    return {"wall_seconds": round(wall, 1), "profile_seconds": meta["seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", type=_config, action="append", help="NAME='OPTIONS' (repeatable; default: the 3 above)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    check_out(args.out)
    configs = dict(args.config) if args.config else dict(DEFAULT)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="run-times-") as tmp:
        for r in range(args.rounds):
            for name, options in configs.items():
                runs[name].append(time_run(options, Path(tmp) / f"{name}-{r}"))
                print(f"round {r + 1}: {name}: {runs[name][-1]}", flush=True)
    first = next(iter(configs))
    median = {n: statistics.median(x["wall_seconds"] for x in rs) for n, rs in runs.items()}
    result = {
        name: {
            "options": configs[name],
            "runs": runs[name],
            "median_wall_seconds": median[name],
            "median_profile_seconds": statistics.median(x["profile_seconds"] for x in runs[name]),
            f"wall_vs_{first}": round(median[name] / median[first], 3),
        }
        for name in configs
    }
    for name, row in result.items():
        print(f"{name} ({row['options']}): {row['median_wall_seconds']:.1f} s (profile "
              f"{row['median_profile_seconds']:.1f} s), {row[f'wall_vs_{first}']:.3f}x {first}")  # fmt: skip
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
