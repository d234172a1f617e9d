"""pyramidinfer runtime: apply a calibrated per-layer KV retention schedule to a transformers causal LM.

    import runtime
    schedule = runtime.load_schedule("schedules/smollm2-135m-instruct_b0.3.json")
    with runtime.apply(model, schedule):
        out = model.generate(**batch, max_new_tokens=64, return_dict_in_generate=True)
    runtime.kv_bytes(out.past_key_values)

This package must stay lean: it never imports calibrate, optuna, datasets or scipy.
"""

from .schedule import Decode, ModelInfo, Schedule, ScheduleError, Selection, load_schedule

__all__ = ["Decode", "ModelInfo", "Schedule", "ScheduleError", "Selection", "load_schedule"]

from .apply import apply, new_cache  # noqa: E402
from .cache import PyramidCache, cache_bytes, kv_bytes  # noqa: E402
from .families import FAMILIES, UnsupportedModelError, model_info  # noqa: E402

__all__ += [
    "apply",
    "new_cache",
    "PyramidCache",
    "cache_bytes",
    "kv_bytes",
    "FAMILIES",
    "UnsupportedModelError",
    "model_info",
]
