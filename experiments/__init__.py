"""Small, rerunnable measurements behind design choices stated in the README (python -m experiments.X)."""

from pathlib import Path

from calibrate.errors import CalibrateError
from calibrate.settings import check_writable


def check_out(out: str | None) -> None:
    """Fail in one line before minutes of measuring when --out cannot be written, not after."""
    if out:
        try:
            check_writable(Path(out))
        except CalibrateError as e:
            raise SystemExit(f"error: {e}") from None
