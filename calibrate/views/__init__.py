"""Plots and text views of calibration artifacts for the notebooks in notebooks/ (no model is ever run).

Every plotting function takes data objects (a `Profile`, `Schedule`, Optuna study or a benchmark dict) and returns a
matplotlib Figure built without pyplot (no global state, any backend); `show` turns one into a small PNG for a
notebook. Artifact lookups (`find_*`) return None when nothing is there, so a notebook can say what is missing.

    from calibrate import views
    from calibrate.profiling import Profile
    fig = views.recall_heatmap(Profile.load("schedules/smollm2-135m-instruct"))
    views.show(fig)

Submodules (one concept each; every public name is re-exported here, so `views.NAME` keeps working):

    display         figures without pyplot, `show` / `png`, colours, heat maps and value formatting
    artifacts       finding artifacts on disk: `find_root`, `find_schedule`, `find_profile`, `find_study`,
                    `find_eval`, `find_bench`, and `rel` for printing paths
    profile_views   a Profile: recall heat map and decay, single-layer sensitivity (per kind)
    schedule_views  a Schedule: reference schedules, retention, kept tokens, KV head shares, provenance
    search_views    an Optuna search: loading the study, its trials and shipped schedules, history, Pareto front
    bench_views     a `calibrate bench --out` result: loading it and its bar charts
"""

from .artifacts import find_bench, find_eval, find_profile, find_root, find_schedule, find_study, rel
from .bench_views import bench_bars, load_bench
from .display import DPI, figure, png, show
from .profile_views import recall_decay, recall_heatmap, sensitivity_by_kind, sensitivity_curves
from .schedule_views import (
    REFERENCE_KINDS,
    head_shares,
    kept_tokens,
    provenance_text,
    references,
    retention,
    schedule_budget,
)
from .search_views import (
    complete_trials,
    history,
    kv_of,
    load_study,
    objective_of,
    pareto_front,
    shipped_schedules,
    storage_url,
    study_text,
)

__all__ = [
    "DPI",
    "REFERENCE_KINDS",
    "bench_bars",
    "complete_trials",
    "figure",
    "find_bench",
    "find_eval",
    "find_profile",
    "find_root",
    "find_schedule",
    "find_study",
    "head_shares",
    "history",
    "kept_tokens",
    "kv_of",
    "load_bench",
    "load_study",
    "objective_of",
    "pareto_front",
    "png",
    "provenance_text",
    "recall_decay",
    "recall_heatmap",
    "references",
    "rel",
    "retention",
    "schedule_budget",
    "sensitivity_by_kind",
    "sensitivity_curves",
    "shipped_schedules",
    "show",
    "storage_url",
    "study_text",
]
