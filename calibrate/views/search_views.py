"""Views of an Optuna search: loading the study, its trials, a text summary, the schedules it shipped, the
optimisation history and the KV / quality Pareto front."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .display import _fmt, _styled, _tab, figure


def storage_url(storage: str | Path) -> str:
    """An Optuna storage URL for an SQLite file or a URL. A missing file raises FileNotFoundError (Optuna would
    silently create an empty database)."""
    text = str(storage)
    if "://" in text:
        return text
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"no Optuna study database at {path}")
    return f"sqlite:///{path.resolve()}"


def load_study(storage: str | Path, name: str | None = None):
    """The study `name` (default: the one with the most trials) from the storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage)
    summaries = optuna.get_all_study_summaries(url)
    if not summaries:
        raise LookupError(f"no study in {storage}")
    if name is None:
        name = max(summaries, key=lambda s: s.n_trials).study_name
    elif name not in {s.study_name for s in summaries}:
        raise LookupError(f"no study '{name}' in {storage}; it has {', '.join(s.study_name for s in summaries)}")
    return optuna.load_study(study_name=name, storage=url)


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def objective_of(trial) -> float:
    """The quality objective of a trial (the last value: multi-budget studies also minimise the KV fraction)."""
    return trial.values[-1]


def kv_of(trial) -> float | None:
    if trial.values and len(trial.values) > 1:
        return trial.values[0]
    v = trial.user_attrs.get("kv_fraction")
    return float(v) if isinstance(v, (int, float)) else None


def study_text(study) -> str:
    """Counts per state, budgets, and the best trial per budget."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name.lower() for t in trials)
    attrs = study.user_attrs
    budgets = attrs.get("budgets") or sorted({t.params.get("budget") for t in trials if "budget" in t.params})
    lines = [
        f"study {study.study_name}: {len(trials)} trials ({', '.join(f'{v} {k}' for k, v in states.items())}); "
        f"{len(study.directions)} objective(s); budgets {budgets}; trial budget {attrs.get('trials', '?')}"
    ]
    done = complete_trials(study)
    for b in budgets or [None]:
        pool = [t for t in done if b is None or t.params.get("budget", b) == b]
        if pool:
            best = min(pool, key=objective_of)
            lines.append(
                f"  best at budget {b}: trial {best.number}, objective {objective_of(best):.4f}, "
                f"shape {best.params.get('shape')}, KV {_fmt(kv_of(best), 3)}"
            )
        else:
            lines.append(f"  budget {b}: no finished trial yet")
    return "\n".join(lines)


def shipped_schedules(storage: str | Path, study) -> dict[str, Any]:
    """Schedules written beside the study's database by `calibrate run` (NAME.json or NAME_bBUDGET.json for
    NAME.optuna.db), keyed by file name; only those whose provenance names a trial."""
    from runtime.schedule import ScheduleError, load_schedule

    if "://" in str(storage):
        out = study.user_attrs.get("out")
        if not out:
            return {}
        folder, name = Path(out).parent, Path(out).stem
    else:
        folder, name = Path(storage).parent, Path(storage).name.removesuffix(".optuna.db")
    base = name.rsplit("_b", 1)[0] if "_b" in name else name
    paths = [folder / f"{name}.json"]
    paths += [folder / f"{base}_b{b:g}.json" for b in study.user_attrs.get("budgets", [])]
    found: dict[str, Any] = {}
    for path in dict.fromkeys(paths):
        if path.is_file():
            try:
                s = load_schedule(path)
            except ScheduleError:
                continue
            if isinstance(s.provenance.get("trial"), int):
                found[path.name] = s
    return found


def _objective_scale(ax, values: Sequence[float]) -> None:
    """Log scale when every objective is positive (it can be negative: a schedule may answer more retrieval
    questions than the full cache)."""
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")


def _objective_axes(ax, trials: Sequence, xlabel: str, title: str) -> None:
    """The objective axis of a plot of trials (log scale when it fits), labels, grid, legend and title."""
    _objective_scale(ax, [objective_of(t) for t in trials])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("objective (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


@_styled
def history(study) -> Any:
    """Objective per finished trial (enqueued baselines marked) with the running best, one colour per budget."""
    fig, ax = figure(7.5, 3.6)
    done = complete_trials(study)
    budgets = sorted({t.params.get("budget") for t in done}, key=lambda b: (b is None, b))
    for i, b in enumerate(budgets):
        pool = sorted((t for t in done if t.params.get("budget") == b), key=lambda t: t.number)
        color = _tab(i)
        label = "trials" if b is None else f"budget {b:g}"
        ax.scatter([t.number for t in pool], [objective_of(t) for t in pool], s=14, color=color, label=label)
        best, xs, ys = math.inf, [], []
        for t in pool:
            best = min(best, objective_of(t))
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color=color, lw=1.2)
    refs = [t for t in done if "fixed_params" in t.system_attrs]  # enqueued: the reference shapes
    if refs:
        ax.scatter(
            [t.number for t in refs],
            [objective_of(t) for t in refs],
            s=60,
            facecolors="none",
            edgecolors="black",
            lw=0.8,
            label="enqueued baselines",
        )
    _objective_axes(ax, done, "trial", "optimisation history and running best")
    return fig


@_styled
def pareto_front(study, shipped: Mapping[str, Any] | None = None) -> Any:
    """KV fraction against the objective for every finished trial, the Pareto-optimal ones joined, and the
    shipped schedules (by the trial number in their provenance) marked with stars."""
    fig, ax = figure(7.5, 4.0)
    done = [t for t in complete_trials(study) if kv_of(t) is not None]
    budgets = sorted({t.params.get("budget") for t in done}, key=lambda b: (b is None, b))
    for i, b in enumerate(budgets):
        pool = [t for t in done if t.params.get("budget") == b]
        label = "trials" if b is None else f"budget {b:g}"
        ax.scatter([kv_of(t) for t in pool], [objective_of(t) for t in pool], s=14, alpha=0.7, color=_tab(i),
                   label=label)  # fmt: skip
    front, best = [], math.inf
    for t in sorted(done, key=lambda t: (kv_of(t), objective_of(t))):
        if objective_of(t) < best:
            front.append(t)
            best = objective_of(t)
    if front:
        ax.step([kv_of(t) for t in front], [objective_of(t) for t in front], where="post", color="black", lw=1,
                label="Pareto front")  # fmt: skip
    by_number = {t.number: t for t in done}
    for name, s in (shipped or {}).items():
        t = by_number.get(s.provenance.get("trial"))
        if t is None:
            continue
        ax.scatter([kv_of(t)], [objective_of(t)], marker="*", s=180, color="gold", edgecolors="black", zorder=5)
        ax.annotate(f"{name}\n(trial {t.number})", (kv_of(t), objective_of(t)), textcoords="offset points",
                    xytext=(8, 6), fontsize=7)  # fmt: skip
    _objective_axes(
        ax, done, "KV fraction kept (validation prompts)", "KV memory against quality; stars: shipped schedules"
    )
    return fig
