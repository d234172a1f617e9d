"""What a calibration depends on (`Settings`), read from the command line and checked before any work."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.schedule import ScheduleError

from .errors import CalibrateError
from .head_fisher import SAMPLES as FISHER_SAMPLES
from .profiling import GRID
from .unit_pool import workers_for

# the quick preset's gradient samples per batch: half the default's, the preset's time goal (calibrate run --quick
# <= 90 s on 2 cores); what it costs in held-out KL is in docs/method.md
QUICK_FISHER_SAMPLES = 24


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
    # grid ratios at which head curves are measured, the others following the layer curve's shape; every one by
    # default: fewer cost 3-14% more held-out KL at budgets 0.2-0.3 on SmolLM2 (docs/method.md)
    head_points: list[float] = field(default_factory=lambda: list(GRID))
    # "measured": a forward per head and grid ratio; "fisher": the measured layer curve split over its heads by
    # a second-order estimate (`calibrate.head_fisher`), a few backward passes per window (docs/method.md)
    head_curves: str = "measured"
    fisher_samples: int = FISHER_SAMPLES  # gradient samples per batch of the "fisher" estimate (quick: fewer)
    # the first N tokens of each calibration text window's continuation are all the profile scores (None: every
    # one; the search's validation windows keep theirs): 64 of 128 make a measurement 0.68x as long on SmolLM2,
    # held-out KL within 3% at budgets 0.2-0.3 but 8-11% more at 0.5 (docs/method.md)
    profile_continuation: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # accelerate's placement for a model larger than one device (not part of the key)
    profile_workers: int | None = None  # processes measuring the curves (None: auto, `unit_pool`; not in the key)
    argv: list[str] | None = None  # the command line, for the record (not part of the key)

    NOT_IN_KEY = ("device", "device_map", "profile_workers", "argv")

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        base = dict(context_length=512, continuation=64, calib_windows=2, valid_windows=2, calib_tasks=3, valid_tasks=3)
        # the preset's per-head curves are estimated from 24 samples per batch (calibrate run --quick on SmolLM2: 77 s,
        # 89 s with 48 for 4-8% less held-out KL, side by side; docs/method.md), unless they are to be
        # measured at chosen points or skipped
        if kw.get("head_points") is None and kw.get("per_head", True):
            base["head_curves"] = "fisher"
            base["fisher_samples"] = QUICK_FISHER_SAMPLES
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    @classmethod
    def saved(cls, settings: dict[str, Any]) -> Settings:
        """The settings a profile or schedule saved (`__dict__`), less any field this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in known})

    def keyed(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in self.NOT_IN_KEY}
        if out["head_points"] == list(GRID):  # the whole grid, as every profile before the option: same key
            del out["head_points"]
        if out["head_curves"] == "measured":  # as every profile before the option: same key
            del out["head_curves"]
            del out["fisher_samples"]  # no gradient samples drawn
        # else fisher_samples stays: another sample count is another profile (48, as before the field: same key)
        if out["profile_continuation"] is None:  # every token, as every profile before the option: same key
            del out["profile_continuation"]
        return out

    def key(self) -> str:
        """Fingerprint of what the profile depends on."""
        return hashlib.sha256(json.dumps(self.keyed(), sort_keys=True).encode()).hexdigest()[:12]

    def difference(self, other: dict[str, Any]) -> str:
        """The keyed fields where `other` (saved settings) differs, e.g. "context_length 512 (now 1024)"; both
        sides keyed alike, so that an option given on one side only is named too."""
        mine = self.keyed()
        try:
            theirs = Settings.saved(other).keyed()
        except TypeError:  # unreadable saved settings: compare them as they are
            theirs = dict(other)
        keys = list(mine) + [k for k in theirs if k not in mine]
        changed = [k for k in keys if k not in self.NOT_IN_KEY and theirs.get(k, "unset") != mine.get(k, "unset")]
        return ", ".join(f"{k} {theirs.get(k, 'unset')!r} (now {mine.get(k, 'unset')!r})" for k in changed) or "none"


def from_args(args) -> Settings:
    kw = dict(
        model=args.model,
        data=[str(d) for d in (args.data or [])],
        text_field=args.text_field,
        context_length=args.context_length,
        calib_windows=args.calib_windows,
        valid_windows=args.valid_windows,
        seed=args.seed,
        per_head=not args.no_per_head,
        head_points=head_points_from_arg(getattr(args, "head_points", None)),
        head_curves=getattr(args, "head_curves", None),
        fisher_samples=getattr(args, "fisher_samples", None),
        profile_continuation=getattr(args, "profile_continuation", None),
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        profile_workers=getattr(args, "profile_workers", None),
    )
    if kw["profile_workers"] is not None:  # the conflicts that show before the model is loaded ("auto": after)
        device = "cpu" if kw["device"] == "auto" else kw["device"]
        workers_for(kw["profile_workers"], device, kw["device_map"], getattr(args, "threads", None))
    if args.no_per_head and kw["head_points"] is not None:
        raise CalibrateError("--head-points says where to measure per-head curves, --no-per-head skips them; give one")
    if kw["head_curves"] == "fisher" and args.no_per_head:
        raise CalibrateError("--head-curves fisher estimates per-head curves, --no-per-head skips them; give one")
    if kw["head_curves"] == "fisher" and kw["head_points"] is not None:
        raise CalibrateError(
            "--head-points says where to measure per-head curves, --head-curves fisher measures none; give one"
        )
    if kw["fisher_samples"] is not None and kw["fisher_samples"] < 1:
        raise CalibrateError(f"--fisher-samples {kw['fisher_samples']}: the estimate needs at least 1 sample")
    for name in ("calib_windows", "valid_windows"):
        if kw[name] is not None and kw[name] < 1:
            raise CalibrateError(f"--{name.replace('_', '-')} must be at least 1, got {kw[name]}")
    settings = Settings.quick(**kw) if args.quick else Settings(**{k: v for k, v in kw.items() if v is not None})
    settings.argv = getattr(args, "argv", None)
    if kw["fisher_samples"] is not None and settings.head_curves != "fisher":
        raise CalibrateError(
            f"--fisher-samples {kw['fisher_samples']} sets the samples of --head-curves fisher, which this run does "
            "not use; add --head-curves fisher (or --quick) or drop --fisher-samples"
        )
    if settings.profile_continuation is not None:
        check_cut(settings.profile_continuation, settings.continuation, "--profile-continuation",
                  "leave it out to score all of them")  # fmt: skip
    if settings.context_length < 64:
        raise CalibrateError(f"--context-length {settings.context_length} is too short; use at least 64 tokens")
    return settings


def check_cut(cut: int, whole: int, flag: str, fix: str) -> None:
    """A continuation cut to its first `cut` tokens must keep 2 or more and fewer than its `whole`."""
    if not 2 <= cut < whole:
        raise CalibrateError(
            f"{flag} {cut}: must be 2 to {whole - 1}, fewer than a text window's {whole} continuation tokens; {fix}"
        )


def head_points_from_arg(text: str | None) -> list[float] | None:
    """--head-points: "all" (every grid ratio) or comma-separated ratios of the profile grid; None when not given
    (the default applies)."""
    from .head_curves import check_points

    if text is None:
        return None
    if text.strip() == "all":
        return list(GRID)
    try:
        indices = check_points([float(x) for x in text.split(",") if x.strip()], GRID)
    except ValueError:
        raise CalibrateError(
            f"--head-points '{text}' is not 'all' or comma-separated ratios of the grid {list(GRID)}; "
            "give e.g. 0.02,0.1,0.5"
        ) from None
    return [GRID[i] for i in indices]  # the grid's own values, in order, each once


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


def check_positions(model, tokens: int, what: str, fix: str) -> None:
    """The one check that `tokens` fit the model's position limit, e.g. what='--context 4096 + --new-tokens 64'."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise CalibrateError(f"{what} = {tokens} tokens exceeds the model's {limit} positions; {fix}")


def check_writable(path: Path, flag: str = "--out") -> None:
    """Fail before any compute when an output cannot be written; create nothing (folders appear on first write)."""
    if path.is_dir():
        raise CalibrateError(f"{flag} '{path}' is a folder; give a file name, e.g. schedules/my-model_b0.3.json")
    folder = path.parent if str(path.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CalibrateError(f"{flag} '{path}': '{existing}' is not a folder; choose another {flag}")
    try:  # really try: permissions do not tell for root, read-only mounts or /proc
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".pyramidinfer-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise CalibrateError(f"{flag} '{path}': folder '{existing}' is not writable; choose another {flag}") from None


def default_out(model_label: str, budgets: list[float]) -> Path:
    tag = f"b{budgets[0]:g}" if len(budgets) == 1 else "b" + "-".join(f"{b:g}" for b in budgets)
    return Path("runs") / f"{model_label}_{tag}.json"  # never over the shipped files in schedules/


def budget_out(out: Path, budget: float, several: bool) -> Path:
    """One file per budget when several are searched: NAME_b0.3.json."""
    if not several:
        return out
    stem = out.stem.split("_b")[0] if "_b" in out.stem else out.stem
    return out.with_name(f"{stem}_b{budget:g}{out.suffix}")


def profile_stem(out: Path) -> Path:
    """Where a schedule's profile lives: NAME.profile.json / NAME.profile.safetensors beside NAME.json."""
    return out.with_suffix("")
