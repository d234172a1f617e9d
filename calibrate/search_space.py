"""The Optuna search over retention schedules under a KV-memory budget.

A trial proposes an allocation shape and selection settings; the shape is rescaled to the budget (so no trial
ever exceeds it) and scored end to end on the validation examples. The reference shapes and the
sensitivity-based allocation are enqueued first, so the best trial is never worse than them on validation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState

from runtime.reference import at_budget, rescale_to_budget
from runtime.schedule import ModelInfo, Schedule, Selection, head_means

from .allocate import blend, mean_ratio_at, water_fill, water_fill_heads
from .profiling import Profile
from .scoring import Evaluator, Scores

REFERENCES = ("uniform", "pyramidkv", "pyramidinfer")
SHAPES = ("sensitivity", *REFERENCES, "linear", "exponential")
HEADS = "heads"  # water-filled over KV heads: offered where the profile has per-head curves
ALLOCATIONS = ("sensitivity", HEADS)  # shapes built by water-filling (knobs: exponent, mix)
SEARCH_WINDOWS = (16, 32, 64)  # recent-window sizes a trial may pick
ACCURACY_WEIGHT = 0.5  # objective = KL + weight * (retrieval accuracy lost against the full cache)


@dataclass
class Suite:
    """Validation examples: natural text (KL) and generated retrieval tasks (KL of the answer, exact match)."""

    text: Evaluator
    tasks: Evaluator | None = None
    full_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.tasks is not None and self.full_accuracy is None:
            self.full_accuracy = self.tasks.full_accuracy()

    def score(self, schedule: Schedule, on_batch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
        text = self.text.score(schedule, on_batch)
        out: dict[str, Any] = {"kl": text.kl, "ppl": text.ppl}
        penalty = 0.0
        if self.tasks is not None:
            task: Scores = self.tasks.score(schedule)
            out.update(task_kl=task.kl, accuracy=task.accuracy, full_accuracy=self.full_accuracy)
            penalty = ACCURACY_WEIGHT * max(0.0, (self.full_accuracy or 0.0) - (task.accuracy or 0.0))
        out["objective"] = text.kl + penalty
        return out


@dataclass
class Space:
    """What a trial may choose, and what it is built from."""

    budget: float
    context_length: int  # the budget is a KV fraction at this prompt length
    profile: Profile
    model: ModelInfo
    sinks: int = 4
    windows: Sequence[int] = SEARCH_WINDOWS
    default_window: int = 32

    @property
    def shapes(self) -> tuple[str, ...]:
        return (*SHAPES, HEADS) if self.profile.head_parts is not None else SHAPES

    def mean_ratio(self, window: int) -> float:
        """The mean ratio that meets the budget (ignoring rounding; the final rescale makes it exact)."""
        return mean_ratio_at(self.budget, self.context_length, self.sinks + window)

    def shape(self, kind: str, window: int, params: dict[str, float]) -> list[float]:
        layers = self.model.num_layers
        if kind == "sensitivity":
            mean = self.mean_ratio(window)
            filled = water_fill(
                self.profile.allocation_curves(),
                self.profile.grid,
                mean,
                self.profile.compressible,
                exponent=params.get("exponent", 1.0),
            )
            return blend(filled, [mean] * layers, params.get("mix", 0.0))
        if kind in REFERENCES:
            return at_budget(kind, layers, self.budget, prompt_tokens=self.context_length, window=window).ratios
        x = [i / max(layers - 1, 1) for i in range(layers)]
        slope = params.get("slope", 0.0)
        if kind == "linear":
            return [max(0.02, 1 + slope * (2 * xi - 1)) for xi in x]
        if kind == "exponential":
            return [math.exp(3 * slope * (xi - 0.5)) for xi in x]
        raise ValueError(f"unknown shape {kind!r}")

    def head_shares(self, window: int, params: dict[str, float]) -> list[list[float]]:
        """[L][H] shares water-filled over every KV head of every layer, at the budget's mean ratio."""
        mean = self.mean_ratio(window)
        filled = water_fill_heads(
            self.profile.head_allocation_curves(),
            self.profile.grid,
            mean,
            self.profile.compressible,
            exponent=params.get("exponent", 1.0),
        )
        mix = params.get("mix", 0.0)
        return [[min(1.0, max(r, 1e-3)) for r in blend(row, [mean] * len(row), mix)] for row in filled]

    def build(self, kind: str, window: int, params: dict[str, float], selection: Selection) -> Schedule:
        if kind == HEADS:  # per-head shares need per-head selection, whatever the trial chose
            shares = self.head_shares(window, params)
            base = Schedule(
                ratios=head_means(shares),
                head_ratios=shares,
                window=window,
                sinks=self.sinks,
                selection=dataclasses.replace(selection, per_head=True),
                model=self.model,
            )
            return rescale_to_budget(base, self.budget, self.context_length)
        shape = [max(r, 1e-3) for r in self.shape(kind, window, params)]
        base = Schedule(
            ratios=[min(1.0, r) for r in shape],
            window=window,
            sinks=self.sinks,
            selection=selection,
            model=self.model,
        )
        return rescale_to_budget(base, self.budget, self.context_length)


def suggest(trial: optuna.Trial, space: Space) -> Schedule:
    """The search space: shape family with its knob, recent window, and token-selection settings."""
    kind = trial.suggest_categorical("shape", space.shapes)
    params: dict[str, float] = {}
    if kind in ALLOCATIONS:
        params["exponent"] = trial.suggest_float("exponent", 0.5, 2.0, log=True)
        params["mix"] = trial.suggest_float("mix", 0.0, 0.6)
    elif kind in ("linear", "exponential"):
        params["slope"] = trial.suggest_float("slope", -0.9, 0.9)
    window = trial.suggest_categorical("window", list(space.windows))
    pooling = trial.suggest_categorical("pooling", ["none", "avg", "max"])
    kernel = trial.suggest_categorical("pool_kernel", [3, 5, 7, 9]) if pooling != "none" else 1
    selection = Selection(
        per_head=trial.suggest_categorical("per_head", [True, False]),
        query_weighting=trial.suggest_categorical("query_weighting", ["uniform", "linear"]),
        pooling=pooling,
        pool_kernel=kernel,
    )
    return space.build(kind, window, params, selection)


def baseline_params(kind: str, window: int) -> dict[str, Any]:
    """Enqueued trials: the default selection with each reference shape and the plain sensitivity allocation."""
    sel = Selection()
    params: dict[str, Any] = {
        "shape": kind,
        "window": window,
        "pooling": sel.pooling,
        "pool_kernel": sel.pool_kernel,
        "per_head": sel.per_head,
        "query_weighting": sel.query_weighting,
    }
    if kind in ALLOCATIONS:
        params.update(exponent=1.0, mix=0.0)
    return params


class Reseeded(optuna.samplers.BaseSampler):
    """A sampler whose random state at a trial depends only on the seed and the trial's place among the trials
    that did not fail. Optuna stores no sampler state, so without this a study resumed after Ctrl-C (whose trial
    in flight fails) would sample other values than the uninterrupted study; with it, it samples the same ones,
    and workers that start trials at once still draw from different seeds (their trials have different numbers).
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int):
        self.inner, self.seed = inner, seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        place = trial.number - sum(1 for t in failed if t.number < trial.number)
        # Optuna's own reseed_rng draws a random seed; its samplers keep their generators in `_rng`
        for sampler in (self.inner, getattr(self.inner, "_random_sampler", None)):
            if sampler is not None and hasattr(sampler, "_rng"):
                sampler._rng = LazyRandomState(self.seed + place)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def requeue_interrupted(study: optuna.Study) -> int:
    """Enqueue again every enqueued trial (a baseline, a warm start) that failed, e.g. interrupted by Ctrl-C,
    unless a trial with its parameters exists that did not fail. Returns how many."""
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    alive = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    known = [t.system_attrs.get("fixed_params", t.params) for t in alive]
    count = 0
    for t in failed:
        params = t.system_attrs.get("fixed_params")
        if params is not None and params not in known:
            study.enqueue_trial(params)
            known.append(params)
            count += 1
    return count


def create_study(storage: str | None, study_name: str, seed: int, multi: bool = False) -> optuna.Study:
    inner = (
        optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
        if multi
        else optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True, group=True)
    )
    sampler = Reseeded(inner, seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=1)
    kwargs: dict[str, Any] = dict(storage=storage, study_name=study_name, sampler=sampler, load_if_exists=True)
    if multi:
        kwargs["directions"] = ["minimize", "minimize"]
    else:
        kwargs.update(direction="minimize", pruner=pruner)
    return optuna.create_study(**kwargs)


def enqueue_baselines(
    study: optuna.Study, window: int, extra: dict[str, Any] | None = None, heads: bool = False
) -> None:
    """Enqueue the reference and sensitivity trials (and the per-head allocation, where the profile has per-head
    curves) once per study (a resumed study already has them)."""
    for kind in (*REFERENCES, "sensitivity", *([HEADS] if heads else [])):
        study.enqueue_trial({**baseline_params(kind, window), **(extra or {})}, skip_if_exists=True)


def schedule_of_params(params: dict[str, Any], space: Space) -> Schedule:
    """Rebuild a finished trial's schedule from its parameters (the study stores parameters, not files)."""
    return suggest(optuna.trial.FixedTrial({k: v for k, v in params.items() if k != "budget"}), space)


def objective_fn(space: Space, suite: Suite) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        schedule = suggest(trial, space)

        def on_batch(step: int, kl: float) -> None:
            trial.report(kl, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        scores = suite.score(schedule, on_batch)
        record(trial, scores, schedule, space.context_length)
        return scores["objective"]

    return objective


def record(trial: optuna.Trial, scores: dict[str, Any], schedule: Schedule, context_length: int) -> float:
    """Keep a trial's scores and KV fraction on the trial (the study stores what the schedule file reports)."""
    for key, value in scores.items():
        if value is not None:
            trial.set_user_attr(key, float(value))
    kv = schedule.kv_fraction(context_length)
    trial.set_user_attr("kv_fraction", kv)
    return kv


COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # towards a study's trial budget


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials with a score (complete), in the order they were started."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def counted(study: optuna.Study) -> int:
    """Trials that count towards the trial budget: complete or pruned (a failed one is retried)."""
    return len(study.get_trials(deepcopy=False, states=COUNTED))


def baseline_results(study: optuna.Study, budget: float | None = None) -> dict[str, dict[str, float]]:
    """The first finished trial of each enqueued baseline shape with the default selection."""
    default = Selection()
    out: dict[str, dict[str, float]] = {}
    for t in completed(study):
        if budget is not None and t.params.get("budget") != budget:
            continue
        kind = t.params.get("shape")
        if kind in out or kind not in (*REFERENCES, *ALLOCATIONS):
            continue
        if (
            t.params.get("pooling") != default.pooling
            or t.params.get("per_head") != default.per_head
            or (kind in ALLOCATIONS and (t.params.get("exponent") != 1.0 or t.params.get("mix") != 0.0))
        ):
            continue
        out[kind] = {"objective": t.values[-1], **{k: v for k, v in t.user_attrs.items() if isinstance(v, float)}}
    return out
