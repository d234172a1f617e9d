"""The profile beside a schedule: reused when its settings match, resumed curve by curve after an interruption.

While a profile is measured, every finished curve is written (atomically) to `NAME.profile.partial.safetensors`
together with the settings fingerprint; the same command run again takes those curves and measures only the
rest, and the partial file goes once the whole profile is saved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from runtime.schedule import write_atomic

from .errors import CalibrateError
from .settings import Settings
from .unit_pool import workers_for

# the Fisher head pass's time over the layer curves' (calibrate run --head-curves fisher on SmolLM2, 2 cores: about
# 145 s against 136 s, read off its progress bars): only the time estimate printed before the head phase
FISHER_COST = 1.05


def profile_paths(stem: Path) -> tuple[Path, Path, Path]:
    """(summary JSON, tensors, partial checkpoint) of the profile at `stem` (NAME for NAME.json)."""
    name = stem.name
    return (stem.with_name(f"{name}.profile.json"), stem.with_name(f"{name}.profile.safetensors"),
            stem.with_name(f"{name}.profile.partial.safetensors"))  # fmt: skip


class PartialProfile:
    """The curves finished so far for one settings fingerprint (`profile.Checkpoint`)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.tensors: dict[str, torch.Tensor] = {}
        self.discarded = False
        if not path.is_file():
            return
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                same = (f.metadata() or {}).get("settings_key") == key
            if same:
                self.tensors = safetensors.torch.load_file(str(path))
            else:
                self.discarded = True
        except (OSError, ValueError, safetensors.SafetensorError):
            self.discarded = True  # unreadable: measure again, it is overwritten at the first curve

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        write_atomic(self.path, safetensors.torch.save(self.tensors, metadata={"settings_key": self.key}))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def curve_count(settings: Settings, compressible: list[bool], kv_heads: int) -> int:
    """Curves a profile measures: the recall pass, one per compressible layer, one per KV head of those (or the
    one Fisher estimate of them all)."""
    layers = sum(compressible)
    if not (settings.per_head and kv_heads > 1):
        return 1 + layers
    return 1 + layers + (1 if settings.head_curves == "fisher" else layers * kv_heads)


def saved_profile(stem: Path, settings: Settings):
    """(profile, None) when the saved profile has these settings; (None, why not) otherwise."""
    from .profiling import Profile

    summary_path, _, _ = profile_paths(stem)
    if not summary_path.is_file():
        return None, f"no profile at {summary_path}"
    try:
        saved = Profile.load(stem)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        return None, f"{summary_path} cannot be read ({type(e).__name__})"
    if saved.meta.get("settings_key") != settings.key():
        diff = settings.difference(saved.meta.get("settings", {}))
        return None, f"{summary_path} was measured with other settings: {diff}"
    if saved.parts is None:
        return None, f"{summary_path} predates per-kind curves"
    return saved, None


def require_profile(stem: Path, settings: Settings):
    """`calibrate search`: the profile must exist and match; otherwise say what differs and what to run."""
    prof, why = saved_profile(stem, settings)
    if prof is None:
        raise CalibrateError(
            f"{why}; run 'calibrate profile' (or 'calibrate run') with the same settings and --out first"
        )
    return prof


def load_or_measure(model, settings: Settings, data, stem: Path, progress):
    """The saved profile when it was measured with `settings`; else measure it (resuming finished curves)."""
    import runtime

    from . import profiling as profile

    prof, why = saved_profile(stem, settings)
    if prof is not None:
        print(f"profile: reusing {profile_paths(stem)[0]}")
        return prof
    if not why.startswith("no profile"):
        print(f"profile: measuring again: {why}")
    _, _, partial_path = profile_paths(stem)
    partial = PartialProfile(partial_path, settings.key())
    compressible = [c for c, _ in runtime.families.layer_plan(model)]
    kv_heads = runtime.families.model_info(model).num_kv_heads
    total = curve_count(settings, compressible, kv_heads)
    if partial.tensors:
        # the recall pass saves three tensors as one curve
        done = sum(1 for k in partial.tensors if k not in profile.RECALL_CURVES[1:])
        print(f"resuming profile: {done} of {total} curves done ({partial_path})")
    elif partial.discarded:
        print(f"profile: {partial_path} was measured with other settings or is unreadable; starting afresh")
    # checked before the prefill: "--device auto" may have put the model on a GPU
    workers = workers_for(settings.profile_workers, model.device.type, settings.device_map)
    t0 = time.perf_counter()

    def prefill(phase: str, i: int, n: int) -> None:
        progress("profile: prefill", i, n)

    ev, tasks = data.evaluators(model, "calibration", settings.sinks, progress=prefill)
    # the head phase's work in layer phases: a layer's head curves cost its layer curve once per KV head, times
    # the share of grid points they measure; the Fisher pass a measured multiple of the layer phase
    head_work = 0.0
    if settings.per_head and kv_heads > 1:
        if settings.head_curves == "fisher":  # the samples are most of its work
            head_work = FISHER_COST * settings.fisher_samples / profile.SAMPLES
        else:
            head_work = kv_heads * len(settings.head_points) / len(profile.GRID)
    report = _estimate(progress, partial, total, sum(compressible), head_work, workers)

    prof = profile.measure(
        model,
        ev,
        also=[tasks] if tasks is not None else [],
        per_head=settings.per_head,
        head_points=settings.head_points,
        head_curves=settings.head_curves,
        fisher_samples=settings.fisher_samples,
        sinks=settings.sinks,
        window=settings.window,
        progress=report,
        checkpoint=partial,
        workers=workers,
    )
    prof.meta.update(
        settings_key=settings.key(),
        settings=settings.__dict__,
        data=data.describe(),
        seconds=round(time.perf_counter() - t0, 1),
        workers=workers,
    )
    prof.save(stem)
    partial.remove()
    return prof


def _estimate(progress, partial: PartialProfile, total: int, layers: int, head_work: float = 0.0, workers: int = 1):
    """The progress callback of a profile: moves its bars and, once one curve per worker was measured (not
    resumed), prints about how long the curves left will take."""
    # the resumed units are reported first in each phase, then the measuring starts (a report at the same count)
    resumed = {"layer sensitivity": sum(k.startswith("layer.") for k in partial.tensors),
               "head sensitivity": sum(k.startswith("head.") for k in partial.tensors)}  # fmt: skip
    clock: dict[str, Any] = {"start": None, "told": False}

    def report(phase: str, done: int, n: int, work: tuple[float, float] | None = None) -> None:
        progress(f"profile: {phase}", done, n, work=work)
        if clock["told"] or phase not in resumed or done < resumed[phase] or work is None:
            return
        now = time.perf_counter()
        start = clock["start"]
        if start is None or start[0] != phase or start[2] == done:  # the pace is taken within one phase
            clock["start"] = (phase, now, done, work[0])
            return
        if done - start[2] < min(workers, n - start[2]):  # workers finish their first curves together: wait
            return  # for each one's
        pace = (now - start[1]) / max(work[0] - start[3], 1e-9)  # seconds per unit of work
        finished = 1 + done + (layers if phase == "head sensitivity" else 0)  # the recall pass counts as one
        left_work = work[1] - work[0] + (head_work * work[1] if phase == "layer sensitivity" else 0.0)
        minutes = pace * left_work / 60
        print(f"profile: about {minutes:.1f} min for the {total - finished} curves left (from the pace so far; "
              "a deeper layer's curve is cheaper; --head-curves fisher, --no-per-head or --quick for less)",
              flush=True)  # fmt: skip
        clock["told"] = True

    return report
