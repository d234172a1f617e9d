"""The Optuna study of a calibration: its storage, its start (settings, baselines), its trials and its export.

Everything a worker needs lives in the storage (settings, budgets, profile path), so any number of processes on
any machines can join one study; `Study.run` counts every worker's finished trials.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

from . import provenance
from .errors import CalibrateError
from .settings import Settings, budget_out, check_writable, profile_stem


def storage_url(storage: str | None, out: Path) -> str:
    """Default storage: an SQLite file beside the schedule. Any Optuna storage URL is accepted."""
    if storage is None:
        return f"sqlite:///{out.with_suffix('.optuna.db')}"
    if "://" not in storage:
        raise CalibrateError(f"--storage '{storage}' is not a database URL; use e.g. sqlite:///study.db")
    return storage


def sqlite_file(url: str) -> Path | None:
    """The file behind an sqlite:/// URL (None for other databases)."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def check_storage_exists(url: str) -> None:
    """`export` and `worker` read a study that `run` started: never create an empty database instead."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise CalibrateError(
            f"--storage '{url}': no database at '{path}'; give the storage that 'calibrate run' printed "
            "(by default NAME.optuna.db beside its schedule)"
        )


def check_storage(url: str) -> None:
    """Fail before the profile on a storage that cannot work, without creating an SQLite file yet."""
    path = sqlite_file(url)
    if path is None:
        open_storage(url)
    else:
        check_writable(path, "--storage")


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats, the stale-trial callback and multi-objective studies are used on purpose
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    optuna = _quiet_optuna()
    # the retry callback was renamed in Optuna 4.9
    retry = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    )
    retry_arg = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )
    beat = int(os.environ.get("PYRAMIDINFER_HEARTBEAT", "30"))  # seconds; a dead worker's trial fails after 2 beats
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=beat, grace_period=2 * beat, **{retry_arg: retry(max_retry=2)}
        )
    except Exception as e:  # noqa: BLE001 - any storage failure is reported the same way
        msg = " ".join(str(e).split())[:160]
        raise CalibrateError(f"cannot open Optuna storage '{url}': {msg}; check the --storage URL") from None


def study_name_for(model_label: str, budgets: list[float], settings: Settings) -> str:
    tag = "-".join(f"{b:g}" for b in budgets)
    return f"{model_label}_b{tag}_{settings.key()}"


class _CtrlC:
    """Ctrl-C during a search: raised at once while a trial runs the model, deferred while Optuna talks to its
    storage. A KeyboardInterrupt that lands inside a commit (a suggest, a report, a user attribute, the trial's
    own end) breaks Optuna's bookkeeping ("Should not reach") instead of stopping cleanly; deferred, it is raised
    as soon as the commit is done."""

    def __init__(self) -> None:
        self.pending = False  # Ctrl-C was pressed
        self.computing = False  # only the model runs now: raising here leaves the storage consistent

    def handler(self, signum, frame) -> None:
        self.pending = True
        if self.computing:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def computing_only(self):
        self.check()
        self.computing = True
        try:
            yield
        finally:
            self.computing = False

    def suite(self, suite):
        """`suite` whose scoring may be interrupted at once, and whose per-batch callback (a trial's report and
        pruning: storage calls) may not."""
        ctrl = self

        class Interruptible:
            def score(self, schedule, on_batch=None):
                def batch(step: int, kl: float) -> None:
                    ctrl.computing = False
                    try:
                        if on_batch is not None:
                            on_batch(step, kl)
                    finally:
                        ctrl.computing = True
                    ctrl.check()

                with ctrl.computing_only():
                    return suite.score(schedule, batch)

        return Interruptible()

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT this way inside the block (main thread, default handler only: an ignored SIGINT or
        someone else's handler is left alone) and raise a deferred Ctrl-C at its end."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main else None
        if previous is not signal.default_int_handler:
            yield self
            return
        signal.signal(signal.SIGINT, self.handler)
        try:
            yield self
            self.check()
        finally:
            signal.signal(signal.SIGINT, previous)


class Study:
    """An Optuna study and what its trials are built from, read back from its storage."""

    def __init__(self, storage: str, name: str):
        from runtime.schedule import ModelInfo

        from . import search_space as s
        from .profiling import Profile

        try:
            summaries = _quiet_optuna().get_all_study_summaries(open_storage(storage))
        except CalibrateError:
            raise
        except Exception as e:  # noqa: BLE001 - any storage failure is reported the same way
            raise CalibrateError(f"cannot read studies from '{storage}': {' '.join(str(e).split())[:160]}") from None
        if name not in {x.study_name for x in summaries}:
            raise CalibrateError(
                f"--study-name '{name}': no such study in {storage}; start it with 'calibrate run --storage ... "
                "--study-name'"
            )
        attrs = next(x for x in summaries if x.study_name == name).user_attrs
        if "settings" not in attrs or "profile" not in attrs:
            raise CalibrateError(f"study '{name}' was not started by 'calibrate run'; nothing to continue")
        self.settings = Settings(**attrs["settings"])
        self.budgets = list(attrs["budgets"])
        self.trials = int(attrs["trials"])
        self.out = Path(attrs["out"])
        self.data_description = attrs.get("data", {})
        self.info = ModelInfo(**attrs["model_info"])
        self.windows = list(attrs["windows"])
        try:
            self.profile = Profile.load(attrs["profile"])
        except OSError:
            raise CalibrateError(f"the study's profile {attrs['profile']} is missing; copy it there") from None
        self.multi = len(self.budgets) > 1
        self.study = s.create_study(open_storage(storage), name, self.settings.seed, multi=self.multi)
        st = self.settings
        self.spaces = {
            b: s.Space(b, st.context_length, self.profile, self.info, st.sinks, self.windows, st.window)
            for b in self.budgets
        }

    @staticmethod
    def start(
        storage: str,
        name: str,
        settings: Settings,
        budgets: list[float],
        trials: int,
        out: Path,
        info,
        prof_stem: Path,
        data,
        warm: list[dict[str, Any]] | None = None,
        heads: bool = False,
    ) -> Study:
        """Create (or reopen) the study, record its settings, and enqueue the baselines and `warm` once.

        heads: the profile has per-head curves, so the per-head allocation is a baseline too."""
        from . import search_space as s

        study = s.create_study(open_storage(storage), name, settings.seed, multi=len(budgets) > 1)
        room = min(budgets) * settings.context_length - settings.sinks
        windows = [w for w in s.SEARCH_WINDOWS if w <= room] or [settings.window]
        for key, value in (
            ("settings", dict(settings.__dict__)),
            ("budgets", budgets),
            ("trials", trials),
            ("out", str(out.resolve())),
            ("profile", str(prof_stem.resolve())),
            ("model_info", info.__dict__),
            ("windows", windows),
            ("data", data.describe()),
        ):
            study.set_user_attr(key, value)
        # a trial enqueued before and interrupted runs again, before anything new (a resumed study then holds what
        # the uninterrupted one would)
        s.requeue_interrupted(study)
        # a multi-budget study searches the budget too: each enqueued trial is pinned to one, for every budget
        pins = [{"budget": b} for b in budgets] if len(budgets) > 1 else [{}]
        for pin in pins:
            s.enqueue_baselines(study, settings.window, pin, heads=heads)
        for params in warm or []:
            for pin in pins:
                study.enqueue_trial({**params, **pin}, skip_if_exists=True)
        return Study(storage, name)

    def finished(self) -> int:
        """Trials that count towards the budget: complete or pruned (a failed one is retried)."""
        from . import search_space as s

        return s.counted(self.study)

    def run(self, model, data, progress=None) -> None:
        """Run trials until the study holds its trial budget (counting every worker's finished trials)."""
        optuna = _quiet_optuna()
        from optuna.study import MaxTrialsCallback

        from . import search_space as s

        settings = self.settings
        ctrl = _CtrlC()
        suite = ctrl.suite(s.Suite(*data.evaluators(model, "validation", settings.sinks)))
        budgets, spaces = self.budgets, self.spaces

        def objective(trial):
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process ran it
            if not self.multi:
                return s.objective_fn(spaces[budgets[0]], suite)(trial)
            schedule = s.suggest(trial, spaces[trial.suggest_categorical("budget", budgets)])
            scores = suite.score(schedule)
            kv = s.record(trial, scores, schedule, settings.context_length)
            return kv, scores["objective"]

        # a worker that died mid-trial stops beating; fail (and re-queue) its trial even if no trial is left to run
        optuna.storages.fail_stale_trials(self.study)
        done = self.finished()
        if done:
            print(f"search: study '{self.study.study_name}' has {done} finished trials of {self.trials}")
        stop = MaxTrialsCallback(self.trials, states=s.COUNTED)
        # Optuna logs a trial's exception with its traceback before re-raising it; Ctrl-C is reported by the CLI
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            with ctrl.installed():
                while self.finished() < self.trials:
                    ctrl.check()
                    self.study.optimize(objective, n_trials=1, catch=(RuntimeError,), callbacks=[stop])
                    if progress:
                        progress("search: trials", min(self.finished(), self.trials), self.trials)
        finally:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.storages.fail_stale_trials(self.study)

    def export(self, out: Path | None = None, started: float | None = None) -> list[Path]:
        """Write one schedule per budget: the best finished trial, with the baselines' scores beside it."""
        from runtime.schedule import Decode

        from . import search_space as s

        out = out or self.out
        written = []
        completed = s.completed(self.study)
        for b in self.budgets:
            trials_b = [t for t in completed if not self.multi or t.params.get("budget") == b]
            if not trials_b:
                raise CalibrateError(f"no finished trial for budget {b:g} yet; run more trials")
            best = min(trials_b, key=lambda t: t.values[-1])
            schedule = s.schedule_of_params(best.params, self.spaces[b])
            baselines = s.baseline_results(self.study, budget=b if self.multi else None)
            record = provenance.searched(
                best, baselines, self.settings, self.data_description, self.profile, schedule, len(completed), started
            )
            name = f"{schedule.model.name}_b{b:g}" if schedule.model else f"b{b:g}"
            schedule = schedule.with_ratios(
                schedule.ratios, name=name, provenance=record, budget=b, decode=Decode(), prefill_mode="evict"
            )
            path = budget_out(out, b, self.multi)
            schedule.save(path)
            written.append(path)
            print(provenance.summary(path, schedule, best, baselines))
        # one profile for all budgets, NAME.profile.* beside NAME.json (NAME_b0.3.json finds it there)
        self.profile.save(profile_stem(out))
        return written
