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


def default_profile_evaluators():
    """SmolLM2 (float32, CPU) and the evaluators of what `calibrate run` profiles by default, with the schedule
    that keeps every token: (model, evaluators, base schedule)."""
    from calibrate.data import CalibrationSet
    from calibrate.models import load_model
    from calibrate.settings import Settings
    from runtime.schedule import Schedule

    model, tok = load_model(None, "float32", "cpu")
    settings = Settings()
    data = CalibrationSet(tok, settings)
    evaluators = [ev for ev in data.evaluators(model, "calibration", settings.sinks) if ev is not None]
    base = Schedule(ratios=[1.0] * evaluators[0].layers, window=settings.window, sinks=settings.sinks)
    return model, evaluators, base
