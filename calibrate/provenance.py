"""What a schedule file records about how it was made: command, data, scores against the baselines, versions."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

OBJECTIVE = "KL(full || compressed) per token on validation continuations + 0.5 x retrieval accuracy lost"


def command_line(argv: list[str] | None = None) -> str:
    return " ".join(["calibrate", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def versions() -> dict[str, str]:
    import optuna
    import torch
    import transformers

    from . import __version__

    return {
        "pyramidinfer": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
    }


def _common(settings, data_description: dict[str, Any], started: float | None) -> dict[str, Any]:
    return {
        "command": command_line(settings.argv),
        "data": data_description,
        "seed": settings.seed,
        "settings": settings.__dict__,
        "wall_seconds": round(time.time() - started, 1) if started else None,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def searched(best, baselines: dict, settings, data_description, prof, schedule, n_trials: int, started) -> dict:
    """Provenance of the best trial of a study: its scores, the baselines' and how additive the profile was."""
    values = {k: v for k, v in best.user_attrs.items() if isinstance(v, (int, float))}
    return {
        "metric": OBJECTIVE,
        "score": values,
        "baselines": baselines,
        "margin_vs_best_baseline": margin(baselines, best.values[-1]),
        "additivity": {
            "sum_of_single_layer_kl": prof.predicted_kl(schedule.ratios, schedule.head_ratios),
            "measured_kl": (values.get("kl", 0.0) + values.get("task_kl", values.get("kl", 0.0))) / 2,
            "note": "single-layer KLs from the profile (text and tasks averaged) vs the whole schedule's KL",
        },
        "trial": best.number,
        "trials": n_trials,
        "params": dict(best.params),
        **_common(settings, data_description, started),
    }


def water_filled(unit: str, settings, data_description, prof, schedule, started) -> dict:
    """Provenance of a `--no-search` schedule: the sensitivity allocation, unscored."""
    return {
        "method": f"water-filling on the profile's single-{unit} sensitivity curves, text and tasks weighed"
        " equally (no search)",
        "predicted_kl": prof.predicted_kl(schedule.ratios, schedule.head_ratios),
        **_common(settings, data_description, started),
    }


def margin(baselines: dict, objective: float) -> float | None:
    """How much lower (better) the calibrated objective is than the best enqueued baseline on validation."""
    values = [v["objective"] for v in baselines.values() if "objective" in v]
    return min(values) - objective if values else None


def summary(path: Path, schedule, best, baselines) -> str:
    """The lines printed after a schedule is written: it beside every baseline on validation."""
    lines = [f"\nwrote {path}  (trial {best.number}, KV fraction {schedule.kv_fraction():.3f})"]
    lines.append(f"{'schedule':<14} {'objective':>10} {'KL':>8} {'task acc':>9}")
    rows = [(k, v) for k, v in baselines.items()] + [("calibrated", {**best.user_attrs, "objective": best.values[-1]})]
    for name, v in rows:
        acc = v.get("accuracy")
        lines.append(
            f"{name:<14} {v.get('objective', float('nan')):>10.4f} {v.get('kl', float('nan')):>8.4f} "
            f"{'' if acc is None else format(acc, '.2f'):>9}"
        )
    return "\n".join(lines)
