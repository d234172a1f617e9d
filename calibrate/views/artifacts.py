"""Finding calibration artifacts on disk for the notebooks: the repository root, schedules, profiles, Optuna
studies, eval results and benchmark files (`find_*` return None or an empty list when nothing is there), and
`rel` to print their paths without machine-specific parts."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path


def find_root(start: str | Path | None = None) -> Path:
    """The repository root: the nearest folder at or above `start` (default: the working folder) that holds
    pyproject.toml; the working folder itself when there is none."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


def rel(path: str | Path | None, root: Path) -> str:
    """`path` relative to the repository root when it is inside it (for printing: no machine-specific paths)."""
    if path is None:
        return "-"
    if "://" in str(path):
        return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", str(path))  # no password in the outputs
    p = Path(path).resolve()
    try:
        return str(p.relative_to(root.resolve()))
    except ValueError:
        return str(p)


def _env_path(var: str | None, root: Path) -> Path | None:
    value = os.environ.get(var) if var else None
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _is_schedule(path: Path) -> bool:
    if path.name.endswith(".profile.json") or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "ratios" in data and "format_version" in data


def find_schedule(
    root: Path, given: str | Path | None = None, env: str | None = "PYRAMIDINFER_NB_SCHEDULE"
) -> Path | None:
    """`given`, else $env (env None: not read), else schedules/smollm2-135m-instruct_b0.3.json, else any
    schedules/*.json, else any schedule file under runs/. Returns the path (which may not exist when it was
    given explicitly) or None."""
    explicit = Path(given) if given else _env_path(env, root)
    if explicit is not None:
        return explicit if explicit.is_absolute() else root / explicit
    default = root / "schedules" / "smollm2-135m-instruct_b0.3.json"
    if default.is_file():
        return default
    for folder, pattern in (("schedules", "*.json"), ("runs", "**/*.json")):
        found = sorted(p for p in (root / folder).glob(pattern) if _is_schedule(p))
        if found:
            return found[0]
    return None


def find_profile(schedule_path: str | Path) -> Path | None:
    """Where the schedule's profile is: `<stem>.profile.json` beside it, else the profile of the whole run
    (`NAME.profile.json` for `NAME_b0.3.json`). None when neither exists."""
    path = Path(schedule_path)
    stem = path.with_suffix("")
    candidates = [stem]
    if "_b" in stem.name:
        candidates.append(stem.with_name(stem.name.rsplit("_b", 1)[0]))
    for c in candidates:
        if c.with_name(c.name + ".profile.json").is_file() and c.with_name(c.name + ".profile.safetensors").is_file():
            return c
    return None


def find_study(
    root: Path, given: str | Path | None = None, env: str | None = "PYRAMIDINFER_NB_STUDY"
) -> str | Path | None:
    """A study's storage: `given` or $env (an SQLite file or any Optuna storage URL), else
    schedules/smollm2-135m-instruct.optuna.db, else any schedules/*.optuna.db, else any under runs/."""
    explicit = given or (os.environ.get(env) if env else None)
    if explicit:
        if "://" in str(explicit):
            return str(explicit)
        p = Path(explicit).expanduser()
        return p if p.is_absolute() else root / p
    default = root / "schedules" / "smollm2-135m-instruct.optuna.db"
    if default.is_file():
        return default
    for folder, pattern in (("schedules", "*.optuna.db"), ("runs", "**/*.optuna.db")):
        found = sorted((root / folder).glob(pattern))
        if found:
            return found[0]
    return None


def _has_keys(path: Path, keys: Iterable[str]) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def find_eval(root: Path, given: str | Path | None = None, env: str | None = "PYRAMIDINFER_NB_EVAL") -> Path | None:
    """An eval results.json (a file or the out dir holding it): `given`, $env, runs/eval_quick/, else the
    largest results.json under docs/ or runs/ (the run with the most results)."""
    explicit = Path(given) if given else _env_path(env, root)
    if explicit is None:
        default = root / "runs" / "eval_quick"
        if (default / "results.json").is_file():
            explicit = default
    if explicit is not None:
        explicit = explicit if explicit.is_absolute() else root / explicit
        return explicit / "results.json" if explicit.is_dir() else explicit
    found = [
        p
        for folder in ("docs", "runs")
        for p in (root / folder).glob("**/results.json")
        if _has_keys(p, ("meta", "records"))
    ]
    return max(found, key=lambda p: (p.stat().st_size, str(p))) if found else None


def find_bench(root: Path, given: str | Path | None = None, env: str | None = "PYRAMIDINFER_NB_BENCH") -> list[Path]:
    """Benchmark JSON files (`calibrate bench --out`): `given` or $env (files, or folders searched for them,
    separated by os.pathsep; a given file is returned even when it does not exist), else every bench*.json
    under docs/ and runs/."""
    value = str(given) if given else (os.environ.get(env) if env else None)
    if value:
        out: list[Path] = []
        for part in value.split(os.pathsep):
            p = Path(part).expanduser()
            p = p if p.is_absolute() else root / p
            if p.is_dir():
                out += sorted(q for q in p.glob("**/*.json") if _has_keys(q, ("stock", "schedule", "ratios")))
            else:
                out.append(p)
        return out
    return sorted(
        p
        for folder in ("docs", "runs")
        for p in (root / folder).glob("**/bench*.json")
        if _has_keys(p, ("stock", "schedule", "ratios"))
    )
