"""`calibrate run` end to end: data -> profile -> search -> schedule file. Each step is also its own command."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.schedule import ScheduleError

from .errors import CalibrateError


@dataclass
class Settings:
    """Everything a calibration depends on; the profile is reused only when these match."""

    model: str | None = None
    data: list[str] = field(default_factory=list)
    text_field: str = "text"
    context_length: int = 1024
    continuation: int = 128
    task_continuation: int = 48
    calib_windows: int = 3
    valid_windows: int = 4
    calib_tasks: int = 6
    valid_tasks: int = 6
    sinks: int = 4
    window: int = 32
    seed: int = 0
    per_head: bool = True  # also measure per-KV-head curves, so schedules may give each head its own share
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # accelerate's placement for a model larger than one device (not part of the key)
    argv: list[str] | None = None  # the command line, for the record (not part of the key)

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        base = dict(context_length=512, continuation=64, calib_windows=2, valid_windows=2, calib_tasks=3, valid_tasks=3)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def key(self) -> str:
        """Fingerprint of what the profile depends on."""
        fields = {k: v for k, v in self.__dict__.items() if k not in ("device", "device_map", "argv")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


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


def check_writable(path: Path) -> None:
    """Fail before any compute when an output cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibrateError(
            f"cannot create folder '{folder}' for '{path}': {e.strerror}; choose another --out"
        ) from None
    if not os.access(folder, os.W_OK):
        raise CalibrateError(f"folder '{folder}' is not writable; choose another --out")
    if path.is_dir():
        raise CalibrateError(f"'{path}' is a folder; give a file name for --out, e.g. schedules/my-model_b0.3.json")


def check_budget(budget: float, settings: Settings) -> None:
    if not (0.0 < budget <= 1.0):
        raise ScheduleError(f"budget {budget:g} is outside (0, 1]; give a mean KV fraction such as 0.3")
    n = settings.context_length
    minimum = (settings.sinks + settings.window) / n
    if budget < minimum:
        raise ScheduleError(
            f"budget {budget:g} is below the minimum {minimum:.4f} = (sinks {settings.sinks} + window "
            f"{settings.window}) / {n} tokens; raise it or calibrate with a longer --context-length"
        )


def storage_url(storage: str | None, out: Path) -> str:
    """Default storage: an SQLite file beside the schedule. Any Optuna storage URL is accepted."""
    if storage is None:
        return f"sqlite:///{out.with_suffix('.optuna.db')}"
    if "://" not in storage:
        raise CalibrateError(f"storage '{storage}' is not a database URL; use e.g. sqlite:///study.db")
    return storage


def open_storage(url: str):
    import inspect

    import optuna

    # the retry callback was renamed in Optuna 4.9
    RetryFailedTrialCallback = (
        getattr(  # noqa: N806
            optuna.storages, "RetryHeartbeatStaleTrialCallback", None
        )
        or optuna.storages.RetryFailedTrialCallback
    )

    beat = int(os.environ.get("PYRAMIDINFER_HEARTBEAT", "30"))  # seconds; a dead worker's trial fails after 2 beats
    retry_arg = (  # renamed in Optuna 4.9
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters
        else "failed_trial_callback"
    )
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=beat, grace_period=2 * beat, **{retry_arg: RetryFailedTrialCallback(max_retry=2)}
        )
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise CalibrateError(f"cannot open Optuna storage '{url}': {msg}; check the URL") from None


class Data:
    """Calibration and validation examples cut from the user's text plus generated retrieval tasks."""

    def __init__(self, tokenizer, settings: Settings):
        import torch

        from . import data, tasks

        s = settings
        if s.data:  # one stream per source, so that every source is in both the calibration and validation sets
            streams = [data.token_stream(tokenizer, data.load_texts([d], s.text_field)) for d in s.data]
            self.source = list(s.data)
        else:
            streams = [data.token_stream(tokenizer, [tasks.filler_text(12000, seed=s.seed)])]
            self.source = ["generated filler"]
        stream = torch.cat(streams)
        length = s.context_length + s.continuation
        calib, valid = data.calibration_split_each(streams, length, s.calib_windows, s.valid_windows, s.seed)
        self.calib_text = tasks.text_examples(calib, s.context_length)
        self.valid_text = tasks.text_examples(valid, s.context_length)
        self.calib_tasks = tasks.make_tasks(tokenizer, s.calib_tasks, s.context_length, s.task_continuation, s.seed)
        self.valid_tasks = tasks.make_tasks(
            tokenizer, s.valid_tasks, s.context_length, s.task_continuation, s.seed + 7919
        )
        self.tokens = int(stream.numel())
        self.digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        return {
            "sources": self.source,
            "tokens": self.tokens,
            "sha256": self.digest,
            "calibration": {"text_windows": len(self.calib_text), "tasks": len(self.calib_tasks)},
            "validation": {"text_windows": len(self.valid_text), "tasks": len(self.valid_tasks)},
        }


def profile_stem(out: Path) -> Path:
    return out.with_suffix("")


class Progress:
    """tqdm bars keyed by phase; one line per phase."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, leave=True, dynamic_ncols=True)
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def build_profile(model, tokenizer, settings: Settings, data: Data, stem: Path, progress: Progress):
    """Load the profile saved beside the schedule if it was measured with the same settings, else measure it."""
    from . import evaluator, profile

    json_path = stem.with_name(stem.name + ".profile.json")
    if json_path.is_file():
        try:
            saved = profile.Profile.load(stem)
        except (OSError, ValueError, KeyError):
            saved = None
        # a profile without per-kind curves predates the equal weighting of text and tasks: measure it again
        if saved is not None and saved.meta.get("settings_key") == settings.key() and saved.parts is not None:
            print(f"profile: reusing {json_path}")
            return saved
    t0 = time.perf_counter()

    def prefill(phase: str, i: int, total: int) -> None:
        progress("profile: prefill", i, total)

    ev = evaluator.Evaluator(model, data.calib_text, query_window=64, sinks=settings.sinks, progress=prefill)
    extra = []
    if data.calib_tasks:
        extra.append(evaluator.Evaluator(model, data.calib_tasks, query_window=64, sinks=settings.sinks))
    prof = profile.measure(
        model,
        ev,
        also=extra,
        per_head=settings.per_head,
        sinks=settings.sinks,
        window=settings.window,
        progress=lambda phase, done, total: progress(f"profile: {phase}", done, total),
    )
    prof.meta.update(
        settings_key=settings.key(),
        settings=settings.__dict__,
        data=data.describe(),
        seconds=round(time.perf_counter() - t0, 1),
    )
    prof.save(stem)
    return prof


def budget_out(out: Path, budget: float, several: bool) -> Path:
    """One file per budget when several are searched: NAME_b0.3.json."""
    if not several:
        return out
    stem = out.stem.split("_b")[0] if "_b" in out.stem else out.stem
    return out.with_name(f"{stem}_b{budget:g}{out.suffix}")


class Study:
    """An Optuna study and what its trials are built from; everything a worker needs lives in the storage."""

    def __init__(self, storage: str, name: str):
        import optuna

        from runtime.schedule import ModelInfo

        from . import search as s
        from .profile import Profile

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            summaries = optuna.get_all_study_summaries(open_storage(storage))
        except Exception as e:  # noqa: BLE001 - any storage failure is reported the same way
            raise CalibrateError(f"cannot read studies from '{storage}': {' '.join(str(e).split())[:160]}") from None
        if name not in {x.study_name for x in summaries}:
            raise CalibrateError(
                f"no study '{name}' in {storage}; start it with 'calibrate run --storage ... --study-name'"
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
        self.spaces = {
            b: s.Space(
                b,
                self.settings.context_length,
                self.profile,
                self.info,
                self.settings.sinks,
                self.windows,
                self.settings.window,
            )
            for b in self.budgets
        }

    @staticmethod
    def start(
        storage: str,
        name: str,
        settings: Settings,
        budgets,
        trials,
        out: Path,
        info,
        prof_stem: Path,
        data,
        warm: list[dict[str, Any]] | None = None,
        heads: bool = False,
    ):
        """Create (or reopen) the study, record its settings, and enqueue the baselines and `warm` once.

        heads: the profile has per-head curves, so the per-head allocation is a baseline too."""
        from . import search as s

        study = s.create_study(open_storage(storage), name, settings.seed, multi=len(budgets) > 1)
        room = min(budgets) * settings.context_length - settings.sinks
        windows = [w for w in s.WINDOWS if w <= room] or [settings.window]
        for key, value in (
            ("settings", {k: v for k, v in settings.__dict__.items()}),
            ("budgets", budgets),
            ("trials", trials),
            ("out", str(out.resolve())),
            ("profile", str(prof_stem.resolve())),
            ("model_info", info.__dict__),
            ("windows", windows),
            ("data", data.describe()),
        ):
            study.set_user_attr(key, value)
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
        import optuna

        ok = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=ok))

    def run(self, model, data: Data, progress: Progress | None = None) -> None:
        """Run trials until the study holds its trial budget (counting every worker's finished trials)."""
        import optuna
        from optuna.study import MaxTrialsCallback

        from . import evaluator
        from . import search as s

        settings = self.settings

        def make(examples):
            return evaluator.Evaluator(model, examples, query_window=64, sinks=settings.sinks) if examples else None

        suite = s.Suite(make(data.valid_text), make(data.valid_tasks))
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
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        stop = MaxTrialsCallback(self.trials, states=states)
        while self.finished() < self.trials:
            self.study.optimize(objective, n_trials=1, catch=(RuntimeError,), callbacks=[stop])
            if progress:
                progress("search: trials", min(self.finished(), self.trials), self.trials)
        optuna.storages.fail_stale_trials(self.study)

    def export(self, out: Path | None = None, started: float | None = None) -> list[Path]:
        """Write one schedule per budget: the best finished trial, with the baselines' scores beside it."""
        from . import search as s

        out = out or self.out
        written = []
        for b in self.budgets:
            trials_b = [t for t in s.finished(self.study) if not self.multi or t.params.get("budget") == b]
            if not trials_b:
                raise CalibrateError(f"no finished trial for budget {b:g} yet; run more trials")
            best = min(trials_b, key=lambda t: t.values[-1])
            schedule = s.schedule_of_params(best.params, self.spaces[b])
            baselines = s.baseline_results(self.study, budget=b if self.multi else None)
            path = budget_out(out, b, self.multi)
            schedule = _finish(
                schedule,
                best,
                baselines,
                self.settings,
                self.data_description,
                self.profile,
                b,
                len(s.finished(self.study)),
                started,
            )
            schedule.save(path)
            self.profile.save(profile_stem(path))
            written.append(path)
            print(_summary(path, schedule, best, baselines))
        return written


def _model_label(model, settings: Settings) -> str:
    from .models import model_name

    return model_name(model) if settings.model is None else model_name(settings.model)


def _finish(schedule, best, baselines, settings, data_description, prof, budget, n_trials, started):
    from runtime.schedule import Decode

    values = {k: v for k, v in best.user_attrs.items() if isinstance(v, (int, float))}
    provenance = {
        "command": command_line(settings.argv),
        "data": data_description,
        "metric": f"KL(full || compressed) per token on validation continuations + {0.5} x retrieval accuracy lost",
        "score": values,
        "baselines": baselines,
        "margin_vs_best_baseline": _margin(baselines, best.values[-1]),
        "additivity": {
            "sum_of_single_layer_kl": prof.predicted_kl(schedule.ratios, schedule.head_ratios),
            "measured_kl": (values.get("kl", 0.0) + values.get("task_kl", values.get("kl", 0.0))) / 2,
            "note": "single-layer KLs from the profile (text and tasks averaged) vs the whole schedule's KL",
        },
        "trial": best.number,
        "trials": n_trials,
        "params": dict(best.params),
        "seed": settings.seed,
        "settings": settings.__dict__,
        "wall_seconds": round(time.time() - started, 1) if started else None,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    name = f"{schedule.model.name}_b{budget:g}" if schedule.model else f"b{budget:g}"
    return schedule.with_ratios(
        schedule.ratios, name=name, provenance=provenance, budget=budget, decode=Decode(), prefill_mode="evict"
    )


def _margin(baselines: dict, objective: float) -> float | None:
    """How much lower (better) the calibrated objective is than the best enqueued baseline on validation."""
    values = [v["objective"] for v in baselines.values() if "objective" in v]
    return min(values) - objective if values else None


def _summary(path: Path, schedule, best, baselines) -> str:
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


# ---------------------------------------------------------------- command-line glue shared by run/profile/search


DEVICE_MAP_HELP = (
    "spread a model larger than one device over GPUs, CPU memory and disk (accelerate): auto, balanced, "
    "sequential or a JSON file {module: device}; overrides --device"
)


THREADS_HELP = (
    "CPU threads for torch (default: torch's); with N workers on one machine give each cores/N, since "
    "oversubscribed cores slow every worker down"
)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise CalibrateError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_common_args(p) -> None:
    p.add_argument("--model", help="hub id, model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="D",
        help="text files, folders, JSONL (see --text-field) or datasets names; default: generated filler only",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--context-length", type=int, help="prompt tokens per calibration window (default 1024)")
    p.add_argument("--calib-windows", type=int, help="text windows to profile on (default 3, quick 2)")
    p.add_argument("--valid-windows", type=int, help="text windows the search validates on (default 4, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-per-head",
        action="store_true",
        help="measure per-layer curves only (a 3x faster profile on SmolLM2); every head of a layer then keeps the "
        "same share",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--device-map", help=DEVICE_MAP_HELP)
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--quick", action="store_true", help="small preset (512-token windows, fewer of them)")
    p.add_argument("--out", default=None, help="schedule file to write (default: runs/MODEL_bBUDGET.json)")


def add_search_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, help="mean KV fraction to meet (default 0.3)")
    g.add_argument("--budgets", help="several budgets, comma separated: a multi-objective (NSGA-II) search")
    p.add_argument("--trials", type=int, help="trials in the study, counting finished ones (default 40, quick 12)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file beside --out)")
    p.add_argument("--study-name", help="study name (default: from model, budget and settings)")
    p.add_argument(
        "--no-search",
        action="store_true",
        help="skip Optuna: water-fill the budget on the profile's sensitivity curves (seconds after the profile)",
    )
    p.add_argument(
        "--warm-start",
        nargs="+",
        metavar="SCHEDULE",
        help="schedule files written by an earlier calibration: their search parameters are tried first, beside "
        "the baselines (recalibrating after an upgrade then never loses the old best on validation)",
    )


def settings_from_args(args) -> Settings:
    kw = dict(
        model=args.model,
        data=[str(d) for d in (args.data or [])],
        text_field=args.text_field,
        context_length=args.context_length,
        calib_windows=args.calib_windows,
        valid_windows=args.valid_windows,
        seed=args.seed,
        per_head=not getattr(args, "no_per_head", False),
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
    )
    for name in ("calib_windows", "valid_windows"):
        if kw[name] is not None and kw[name] < 1:
            raise CalibrateError(f"--{name.replace('_', '-')} must be at least 1, got {kw[name]}")
    settings = Settings.quick(**kw) if args.quick else Settings(**{k: v for k, v in kw.items() if v is not None})
    settings.argv = getattr(args, "argv", None)
    if settings.context_length < 64:
        raise CalibrateError(f"--context-length {settings.context_length} is too short; use at least 64 tokens")
    return settings


def warm_start_params(paths: list[str] | None) -> list[dict[str, Any]]:
    """The search parameters recorded in earlier schedule files, less their budget (a shape fits any budget)."""
    from runtime.schedule import load_schedule

    out = []
    for path in paths or []:
        params = load_schedule(path).provenance.get("params")
        if not isinstance(params, dict) or "shape" not in params:
            raise CalibrateError(
                f"--warm-start {path}: the file records no search parameters (provenance.params); "
                "give a schedule written by 'calibrate run' or 'calibrate search'"
            )
        out.append({k: v for k, v in params.items() if k != "budget"})
    return out


def budgets_from_args(args) -> list[float]:
    if getattr(args, "budgets", None):
        try:
            values = sorted({float(x) for x in args.budgets.split(",") if x.strip()})
        except ValueError:
            raise CalibrateError(f"--budgets '{args.budgets}' is not a comma-separated list of numbers") from None
        if not values:
            raise CalibrateError("--budgets is empty; give e.g. 0.2,0.3,0.5")
        return values
    return [args.budget if getattr(args, "budget", None) is not None else 0.3]


def default_out(model_label: str, budgets: list[float]) -> Path:
    tag = f"b{budgets[0]:g}" if len(budgets) == 1 else "b" + "-".join(f"{b:g}" for b in budgets)
    return Path("runs") / f"{model_label}_{tag}.json"  # never over the shipped files in schedules/


def study_name_for(model_label: str, budgets: list[float], settings: Settings) -> str:
    tag = "-".join(f"{b:g}" for b in budgets)
    return f"{model_label}_b{tag}_{settings.key()}"


def check_model_fits(model, settings: Settings) -> None:
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    need = settings.context_length + settings.continuation
    if limit is not None and need > limit:
        raise CalibrateError(
            f"--context-length {settings.context_length} + {settings.continuation} continuation tokens exceeds the "
            f"model's {limit} positions; use a shorter --context-length"
        )


def check_supported(model) -> None:
    from runtime.families import check_supported as check

    check(model)


def run_command(args, do_profile: bool = True, do_search: bool = True) -> int:
    """Shared body of `calibrate run`, `calibrate profile` and `calibrate search`."""
    from .models import load_model, model_name

    started = time.time()
    settings = settings_from_args(args)
    set_threads(args.threads)
    budgets = budgets_from_args(args) if do_search else [0.3]
    for b in budgets:
        check_budget(b, settings)
    label = model_name(settings.model)
    out = Path(args.out) if args.out else default_out(label, budgets)
    if do_search:
        for b in budgets:
            check_writable(budget_out(out, b, len(budgets) > 1))
    else:
        check_writable(out)
    searching = do_search and not getattr(args, "no_search", False)
    storage = storage_url(getattr(args, "storage", None), out) if searching else None
    if storage:
        open_storage(storage)  # a bad URL fails now, not after the profile
    warm = warm_start_params(getattr(args, "warm_start", None)) if searching else []
    trials = getattr(args, "trials", None)
    trials = (12 if args.quick else 40) if trials is None else trials
    if trials < 1:
        raise CalibrateError("--trials must be at least 1")
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.device_map)
    check_supported(model)
    check_model_fits(model, settings)
    data = Data(tokenizer, settings)
    progress = Progress()
    try:
        stem = profile_stem(out)
        if do_profile:
            prof = build_profile(model, tokenizer, settings, data, stem, progress)
            progress.close()
            print(prof.table())
            print(f"profile: {stem}.profile.json / .profile.safetensors")
        else:
            from .profile import Profile

            try:
                prof = Profile.load(stem)
            except OSError:
                raise CalibrateError(
                    f"no profile at {stem}.profile.json; run 'calibrate profile' (or 'calibrate run') first"
                ) from None
        if do_search and getattr(args, "no_search", False):
            from runtime.families import model_info

            water_fill_only(prof, settings, budgets, out, model_info(model, name=label), data, started)
        elif do_search:
            from runtime.families import model_info

            name = getattr(args, "study_name", None) or study_name_for(label, budgets, settings)
            info = model_info(model, name=label)
            heads = prof.head_parts is not None
            study = Study.start(storage, name, settings, budgets, trials, out, info, stem, data, warm, heads)
            study.run(model, data, progress)
            progress.close()
            study.export(out, started)
    finally:
        progress.close()
    print(f"done in {time.time() - started:.0f} s")
    return 0


def worker_command(args) -> int:
    """Join a study: read its settings and profile from the storage, run trials until its budget is reached."""
    from .models import load_model

    set_threads(args.threads)
    study = Study(args.storage, args.study_name)
    settings = study.settings
    if args.device:
        settings.device = args.device
    if args.device_map:
        settings.device_map = args.device_map
    model, tokenizer = load_model(settings.model, settings.dtype, settings.device, settings.device_map)
    data = Data(tokenizer, settings)
    progress = Progress()
    try:
        study.run(model, data, progress)
    finally:
        progress.close()
    print(f"worker: study '{args.study_name}' holds {study.finished()} finished trials (budget {study.trials})")
    return 0


def export_command(args) -> int:
    study = Study(args.storage, args.study_name)
    out = Path(args.out) if args.out else study.out
    for b in study.budgets:
        check_writable(budget_out(out, b, study.multi))
    study.export(out)
    return 0


def water_fill_only(prof, settings: Settings, budgets: list[float], out: Path, info, data: Data, started: float):
    """`--no-search`: the sensitivity allocation at each budget, default selection, no validation scoring."""
    from runtime.schedule import Selection

    from . import search as s

    written = []
    for b in budgets:
        space = s.Space(b, settings.context_length, prof, info, settings.sinks, [settings.window], settings.window)
        kind = s.HEADS if s.HEADS in space.shapes else "sensitivity"
        schedule = space.build(kind, settings.window, {"exponent": 1.0, "mix": 0.0}, Selection())
        unit = "KV head" if kind == s.HEADS else "layer"
        provenance = {
            "command": command_line(settings.argv),
            "data": data.describe(),
            "method": f"water-filling on the profile's single-{unit} sensitivity curves, text and tasks weighed"
            " equally (no search)",
            "seed": settings.seed,
            "settings": settings.__dict__,
            "predicted_kl": prof.predicted_kl(schedule.ratios, schedule.head_ratios),
            "wall_seconds": round(time.time() - started, 1),
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = budget_out(out, b, len(budgets) > 1)
        schedule.with_ratios(schedule.ratios, name=f"{info.name}_b{b:g}", provenance=provenance, budget=b).save(path)
        prof.save(profile_stem(path))
        written.append(path)
        print(f"wrote {path} (water-filled, KV fraction {schedule.kv_fraction():.3f})")
    return written
