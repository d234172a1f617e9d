"""Figures and display for the views: matplotlib Figures built without pyplot under the default style, the small
PNGs the notebooks show, the colours, the layer-by-row heat map and the value formatting the views share."""

from __future__ import annotations

import functools
import io
import math
import sys
from collections.abc import Callable
from typing import Any

DPI = 80  # notebook outputs are committed: keep the PNGs small
_TAB = ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")


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


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return str(v)
