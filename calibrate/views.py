"""Plots and text views of calibration artifacts for the notebooks in notebooks/ (no model is ever run).

Every plotting function takes data objects (a `Profile`, `Schedule`, Optuna study or a benchmark dict) and returns a
matplotlib Figure built without pyplot (no global state, any backend); `show` turns one into a small PNG for a
notebook. Artifact lookups (`find_*`) return None when nothing is there, so a notebook can say what is missing.

    from calibrate import views
    from calibrate.profiling import Profile
    fig = views.recall_heatmap(Profile.load("schedules/smollm2-135m-instruct_b0.3"))
    views.show(fig)
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

DPI = 80  # notebook outputs are committed: keep the PNGs small

REFERENCE_KINDS = ("uniform", "pyramidkv", "pyramidinfer")
_TAB = ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")
_COLORS = {
    "calibrated": "tab:green",
    "uniform": "tab:blue",
    "pyramidkv": "tab:orange",
    "pyramidinfer": "tab:red",
    "sensitivity": "tab:purple",
    "full": "black",
}


# ---------------------------------------------------------------- figures and display


def _tab(i: int) -> str:
    """The i-th colour of matplotlib's default cycle, by name (not "C{i}", which follows the current style)."""
    return "tab:" + _TAB[i % len(_TAB)]


def _styled(fn):
    """Build the figure under matplotlib's default style: Optuna's plots switch the global style to ggplot."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib.style

        with matplotlib.style.context("default"):
            return fn(*args, **kwargs)

    return wrapper


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw: Any):
    """A constrained-layout Figure with its axes (a list when there are several), independent of pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    flat = list(axes.flat)
    return fig, (flat[0] if len(flat) == 1 else flat)


def png(fig, dpi: int = DPI, colors: int | None = 256) -> bytes:
    """The figure as PNG bytes, reduced to a palette of `colors` (about 3x smaller; None keeps full colour).
    A pyplot-managed figure (from calibrate.plots or Optuna) is closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    if not colors:
        return buf.getvalue()
    from PIL import Image  # a matplotlib dependency

    small = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=colors).save(small, format="png", optimize=True)
    return small.getvalue()


def show(fig, dpi: int = DPI):
    """A notebook display object for the figure: the same small PNG whatever the matplotlib backend."""
    from IPython.display import Image

    return Image(data=png(fig, dpi), format="png")


# ---------------------------------------------------------------- finding artifacts


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


def profile_stem(schedule_path: str | Path) -> Path | None:
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


# ---------------------------------------------------------------- profile


def _depth_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)], cmap


def _heat(ax, rows: list[list[float]], fmt: str, text_color: Callable[[float], str], **kw) -> Any:
    """A layer-by-row heat map with each cell's value written in it (NaN cells blank); returns the image."""
    image = ax.imshow(rows, aspect="auto", interpolation="nearest", **kw)
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            if math.isfinite(v):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=6, color=text_color(v))
    ax.set_yticks(range(0, len(rows), max(1, len(rows) // 15)))
    ax.set_ylabel("layer")
    return image


@_styled
def recall_heatmap(profile) -> Any:
    """Layer x retention ratio heat map of the recall curves: the share of future attention kept when the recent
    window's attention picks `ratio` of the context. Layers the runtime never compresses are blank."""
    grid = list(profile.grid)
    rows = [
        [float(v) for v in profile.recall[layer].tolist()] if profile.compressible[layer] else [math.nan] * len(grid)
        for layer in range(profile.num_layers)
    ]
    fig, ax = figure(1.1 * len(grid) + 2.2, 0.19 * len(rows) + 1.4)
    image = _heat(ax, rows, "{:.2f}", lambda v: "white" if v < 0.6 else "black", vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
    ax.set_xlabel("retention ratio (share of the context kept)")
    ax.set_title("recall: future attention kept by the recent window's choice", fontsize=9)
    fig.colorbar(image, ax=ax, label="recall", shrink=0.8)
    return fig


def _decay(fit: Mapping[str, float], x: float) -> float:
    return fit["a"] * math.exp(-fit["b"] * x) + fit["c"]


@_styled
def recall_decay(profile, levels: Sequence[float] = (0.9, 0.95), schedule=None) -> Any:
    """Per-layer ratio needed to keep 90% / 95% of the future attention across depth, with the fitted decay
    r(l) = a exp(-b l/L) + c (PyramidInfer's observation: deeper layers need less); optionally the schedule's
    ratios for comparison."""
    fig, ax = figure(7.5, 3.6)
    n = profile.num_layers
    layers = [i for i in range(n) if profile.compressible[i]]
    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange"]
    for color, level in zip(colors, levels):
        need = profile.ratio_for_recall(level)
        ax.plot(layers, [need[i] for i in layers], "o-", color=color, ms=3.5, lw=1, label=f"ratio for {level:.0%}")
        fit = profile.decay_fit(level)
        if fit:
            xs = [i / 10 for i in range(0, 10 * (n - 1) + 1)]
            ys = [_decay(fit, x / n) for x in xs]
            label = f"fit {fit['a']:.2f}·exp(-{fit['b']:.2f}·l/L) + {fit['c']:.2f} (R² {fit['r2']:.2f})"
            ax.plot(xs, ys, "--", color=color, lw=1.2, label=label)
    if schedule is not None:
        ax.step(range(n), schedule.ratios, where="mid", color="tab:green", lw=1.2, alpha=0.7, label="schedule")
    ax.set_xlabel("layer")
    ax.set_ylabel("retention ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("ratio needed to keep future attention, across depth", fontsize=9)
    return fig


@_styled
def sensitivity_curves(profile, floor: float = 1e-6) -> Any:
    """Left: KL against the full cache when only one layer is compressed, against the ratio (a line per layer,
    coloured by depth). Right: the same across depth, a line per ratio. Log scale (values clipped at `floor`)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = figure(11, 3.8, ncols=2)
    grid = list(profile.grid)
    n = profile.num_layers
    colors, cmap = _depth_colors(n)
    sens = [[max(float(v), floor) for v in profile.sensitivity[i].tolist()] for i in range(n)]
    for i in range(n):
        if profile.compressible[i]:
            left.plot(grid, sens[i], "-", marker=".", ms=3, lw=1, color=colors[i])
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xticks(grid, [f"{g:g}" for g in grid], fontsize=7)
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("retention ratio of that layer (others keep everything)")
    left.set_ylabel("KL(full || compressed), nats/token")
    left.set_title("single-layer sensitivity", fontsize=9)
    left.grid(alpha=0.3)

    fig.colorbar(ScalarMappable(Normalize(0, n - 1), cmap), ax=left, label="layer", shrink=0.8)
    layers = [i for i in range(n) if profile.compressible[i]]
    ratio_colors, _ = _depth_colors(len(grid))
    for g, (ratio, color) in enumerate(zip(grid, ratio_colors)):
        right.plot(layers, [sens[i][g] for i in layers], "o-", ms=3, lw=1, color=color, label=f"ratio {ratio:g}")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("KL(full || compressed), nats/token")
    right.set_title("which layers the output depends on", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    return fig


@_styled
def sensitivity_by_kind(profile, ratio: float = 0.1, floor: float = 1e-6) -> Any:
    """Single-layer KL per kind of example (natural text, retrieval tasks) across depth at the grid ratio nearest
    `ratio`. Left: in nats, log scale. Right: each kind divided by its own mean over the compressible layers and
    the grid, and their average: the curves the allocation water-fills (`calibrate.allocate.equal_weight`; the
    search may also reshape them with an exponent or blend towards uniform), at that one ratio. None for a
    profile saved without per-kind curves."""
    from .allocate import equal_weight

    if profile.parts is None:
        return None
    grid = list(profile.grid)
    g = min(range(len(grid)), key=lambda j: abs(grid[j] - ratio))
    layers = [i for i in range(profile.num_layers) if profile.compressible[i]]
    parts = profile.parts.tolist()
    fig, (left, right) = figure(11, 3.6, ncols=2)
    for k, (name, part) in enumerate(zip(profile.part_names, parts, strict=True)):
        relative = equal_weight([part], profile.compressible)  # one kind alone: divided by its own mean
        left.plot(layers, [max(part[i][g], floor) for i in layers], "o-", ms=3, lw=1, color=_tab(k), label=name)
        right.plot(layers, [max(relative[i][g], floor) for i in layers], "o-", ms=3, lw=1, color=_tab(k), alpha=0.6)
    weighted = profile.allocation_curves()
    right.plot(layers, [max(weighted[i][g], floor) for i in layers], "k-", lw=1.8, label="allocation (equal weight)")
    left.set_yscale("log")
    left.set_ylabel("KL(full || compressed), nats/token")
    left.set_title(f"single-layer sensitivity per kind at ratio {grid[g]:g}", fontsize=9)
    right.set_yscale("log")
    right.set_ylabel("KL / that kind's mean (compressible layers, all ratios)")
    right.set_title("what the allocation sees: each kind counts equally", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


# ---------------------------------------------------------------- schedules


def schedule_budget(schedule) -> float:
    return schedule.budget if schedule.budget is not None else schedule.kv_fraction()


def references(schedule, kinds: Sequence[str] = REFERENCE_KINDS) -> dict[str, Any]:
    """The reference schedules at the schedule's budget, prompt length, window and sinks."""
    from runtime.reference import at_budget

    return {
        kind: at_budget(
            kind,
            schedule.num_layers,
            schedule_budget(schedule),
            prompt_tokens=schedule.context_length,
            model=schedule.model,
            window=schedule.window,
            sinks=schedule.sinks,
        )
        for kind in kinds
    }


@_styled
def retention(schedules: Mapping[str, Any], prompt_tokens: int | None = None) -> Any:
    """Per-layer retention ratios of several schedules (e.g. {"calibrated": s, **references(s)}) on one axis;
    the legend gives each one's KV fraction at `prompt_tokens` (default: the first one's context length)."""
    fig, ax = figure(7.5, 3.6)
    first = next(iter(schedules.values()))
    n = prompt_tokens or first.context_length
    for i, (name, s) in enumerate(schedules.items()):
        bold = i == 0
        ax.plot(
            range(s.num_layers),
            s.ratios,
            "o-" if bold else ".-",
            color=_COLORS.get(name, _tab(i)),
            lw=2.2 if bold else 1.1,
            ms=4 if bold else 3,
            label=f"{name} (KV {s.kv_fraction(n):.3f})",
            zorder=3 if bold else 2,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("retention ratio")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"retention per layer at equal KV budget ({n} prompt tokens)", fontsize=9)
    return fig


@_styled
def kept_tokens(schedules: Mapping[str, Any], prompt_tokens: int) -> Any:
    """Tokens each layer holds after prefilling `prompt_tokens` tokens (`Schedule.kept_tokens`): the first
    schedule as bars, the others as lines, the full cache as a dashed line."""
    fig, ax = figure(7.5, 3.4)
    for i, (name, s) in enumerate(schedules.items()):
        kept = s.kept_tokens(prompt_tokens)
        label = f"{name} ({sum(kept) / len(kept):.0f} mean, KV {s.kv_fraction(prompt_tokens):.3f})"
        color = _COLORS.get(name, _tab(i))
        if i == 0:
            ax.bar(range(len(kept)), kept, color=color, alpha=0.6, label=label)
        else:
            ax.plot(range(len(kept)), kept, ".-", lw=1, ms=3, color=color, label=label)
    ax.axhline(prompt_tokens, color="black", ls="--", lw=1, label=f"full cache ({prompt_tokens})")
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens kept")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title(f"tokens kept per layer after a {prompt_tokens}-token prompt", fontsize=9)
    return fig


@_styled
def head_shares(schedule=None, profile=None, ratio: float = 0.1, floor: float = 1e-6) -> Any:
    """Left: the share of the context each KV head of each layer keeps (`head_ratios`). Right: the KL when only
    that head is compressed to the grid ratio nearest `ratio` (the profile's per-head curves, kinds averaged, log
    colour): the shares follow it. Either panel is left out when its data is missing (a per-layer schedule, a
    profile without per-head curves); None when both are. Layers the runtime never compresses are blank."""
    from matplotlib.colors import LogNorm

    shares = schedule.head_ratios if schedule is not None else None
    head_kl = profile.head_parts.mean(0) if profile is not None and profile.head_parts is not None else None
    panels = [p for p in (shares, head_kl) if p is not None]
    if not panels:
        return None
    compressible = schedule.compressible() if schedule is not None else profile.compressible
    fig, axes = figure(3.2 * len(panels) + 1.6, 0.19 * len(panels[0]) + 1.6, ncols=len(panels))
    axes = list(axes) if len(panels) > 1 else [axes]

    if shares is not None:
        ax = axes.pop(0)
        rows = [[float(v) if compressible[i] else math.nan for v in row] for i, row in enumerate(shares)]
        image = _heat(ax, rows, "{:.2g}", lambda v: "white" if v < 0.6 else "black", vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(image, ax=ax, label="share kept", shrink=0.8)
        ax.set_title(f"share kept per KV head (KV {schedule.kv_fraction():.3f})", fontsize=9)
    if head_kl is not None:
        ax = axes.pop(0)
        grid = list(profile.grid)
        g = min(range(len(grid)), key=lambda j: abs(grid[j] - ratio))
        rows = [[max(float(v), floor) if c else math.nan for v in head_kl[i, :, g]] for i, c in enumerate(compressible)]
        finite = [v for row in rows for v in row if math.isfinite(v)]
        norm = LogNorm(vmin=min(finite), vmax=max(finite))
        image = _heat(ax, rows, "{:.1e}", lambda v: "white" if norm(v) < 0.6 else "black", norm=norm, cmap="magma")
        fig.colorbar(image, ax=ax, label="KL, nats/token", shrink=0.8)
        ax.set_title(f"KL when only that head keeps {grid[g]:g}", fontsize=9)
    for ax in fig.axes[: len(panels)]:
        ax.set_xticks(range(len(panels[0][0])))
        ax.set_xlabel("KV head")
    return fig


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)


def provenance_text(schedule) -> str:
    """How the schedule was made: settings, the command, and the validation scores of the baselines against the
    calibrated one (objective, KL, task accuracy), the margin, and the additivity check of the KL."""
    p = schedule.provenance or {}
    model = schedule.model.name if schedule.model else "-"
    lines = [
        f"schedule {schedule.name or '-'}: model {model}, {schedule.num_layers} layers, budget "
        f"{_fmt(schedule.budget, 3)} at {schedule.context_length} prompt tokens (KV fraction "
        f"{schedule.kv_fraction():.3f}), window {schedule.window}, sinks {schedule.sinks}, "
        f"prefill {schedule.prefill_mode}",
        f"selection: {', '.join(f'{k}={v}' for k, v in vars(schedule.selection).items())}",
    ]
    for key, label in (("command", "command"), ("created", "created"), ("metric", "metric")):
        if key in p:
            lines.append(f"{label}: {p[key]}")
    if "trial" in p:
        lines.append(f"best trial: {p['trial']} of {p.get('trials', '?')} finished (params {p.get('params', {})})")
    data = p.get("data") or {}
    if data:
        lines.append(
            f"data: {', '.join(map(str, data.get('sources', [])))} ({data.get('tokens', '?')} tokens); "
            f"calibration {data.get('calibration', {})}, validation {data.get('validation', {})}"
        )
    if "reference" in p:
        lines.append(f"reference shape: {p['reference']}")
    baselines = dict(p.get("baselines") or {})
    score = p.get("score") or {}
    if baselines or score:
        cols = ("objective", "kl", "task_kl", "accuracy", "ppl", "kv_fraction")
        lines += ["", "validation (lower objective and KL are better):"]
        lines.append(f"  {'schedule':<13}" + "".join(f"{c:>12}" for c in cols))
        for name, v in [*baselines.items(), ("calibrated", score)]:
            lines.append(f"  {name:<13}" + "".join(f"{_fmt(v.get(c)):>12}" for c in cols))
    if p.get("margin_vs_best_baseline") is not None:
        best = min(baselines, key=lambda k: baselines[k].get("objective", math.inf)) if baselines else "?"
        lines.append(f"margin vs the best baseline ({best}): {p['margin_vs_best_baseline']:+.4f} (positive: better)")
    add = p.get("additivity")
    if add:
        total, measured = add.get("sum_of_single_layer_kl"), add.get("measured_kl")
        ratio = total / measured if isinstance(total, float) and measured else None
        lines.append(
            f"additivity: sum of single-layer KLs {_fmt(total)} vs measured KL {_fmt(measured)}"
            + (f" (ratio {ratio:.2f}; 1 means the per-layer errors add up)" if ratio else "")
        )
    elif baselines or score:
        lines.append("additivity: not recorded in this schedule (made before the check existed)")
    return "\n".join(lines)


# ---------------------------------------------------------------- Optuna study


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
    _objective_scale(ax, [objective_of(t) for t in done])
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("optimisation history and running best", fontsize=9)
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
    _objective_scale(ax, [objective_of(t) for t in done])
    ax.set_xlabel("KV fraction kept (validation prompts)")
    ax.set_ylabel("objective (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("KV memory against quality; stars: shipped schedules", fontsize=9)
    return fig


# ---------------------------------------------------------------- benchmark


def load_bench(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("stock", "schedule", "ratios") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a `calibrate bench --out` result (no {', '.join(missing)})")
    return data


@_styled
def bench_bars(result: Mapping[str, Any], title: str = "") -> Any:
    """Stock against schedule from one `calibrate bench` result: speed (prefill seconds, decode tokens/s),
    memory (KV after prefill and at the end, peak, MiB), and every ratio schedule / stock."""
    fig, axes = figure(13, 3.6, ncols=3)
    stock, ours, ratios = result["stock"], result["schedule"], result["ratios"]
    mb = 1 / 2**20

    def pair(ax, items, ylabel):
        width = 0.38
        xs = range(len(items))
        for j, (who, data, color) in enumerate((("stock", stock, "tab:gray"), ("schedule", ours, "tab:green"))):
            vals = [data[key] * scale for _, key, scale in items]
            bars = ax.bar([x + (j - 0.5) * width for x in xs], vals, width, color=color, label=who)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(list(xs), [label for label, _, _ in items], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    pair(axes[0], [("prefill s", "prefill_s", 1.0), ("decode tok/s", "decode_tokens_per_s", 1.0)], "seconds | tokens/s")
    axes[0].set_title("speed", fontsize=9)
    pair(
        axes[1],
        [("KV prefill", "kv_bytes_prefill", mb), ("KV end", "kv_bytes_end", mb), ("peak", "peak_memory_bytes", mb)],
        "MiB",
    )
    axes[1].set_title("memory", fontsize=9)
    names = {
        "prefill_s": "prefill time",
        "decode_tokens_per_s": "decode speed",
        "kv_bytes_prefill": "KV prefill",
        "kv_bytes_end": "KV end",
        "peak_memory_bytes": "peak memory",
        "largest_batch": "largest batch",
    }
    keys = [k for k in names if k in ratios]
    better_up = {"decode_tokens_per_s", "largest_batch"}
    colors = ["tab:green" if (ratios[k] > 1) == (k in better_up) else "tab:red" for k in keys]
    bars = axes[2].barh([names[k] for k in keys], [ratios[k] for k in keys], color=colors)
    axes[2].bar_label(bars, fmt="%.2fx", fontsize=7, padding=2)
    axes[2].set_xlim(0, max(1.0, *(ratios[k] for k in keys)) * 1.18)
    axes[2].axvline(1, color="black", lw=1)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("schedule / stock (green: better)")
    axes[2].grid(alpha=0.3, axis="x")
    axes[2].set_title("ratios", fontsize=9)
    head = title or (
        f"{result.get('model', '')} {result.get('dtype', '')} on {result.get('device_name', result.get('device', ''))}"
        f": {result.get('schedule_name', '')} ({result.get('prefill_mode', '')}, KV "
        f"{_fmt(result.get('kv_fraction'), 3)}), batch {result.get('batch')} x {result.get('prompt_tokens')} tokens "
        f"+ {result.get('new_tokens')} new, median of {result.get('repeats')}"
    )
    fig.suptitle(head, fontsize=9)
    return fig
