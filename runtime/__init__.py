"""pyramidinfer runtime: apply a calibrated per-layer KV retention schedule to a transformers causal LM.

    import runtime
    schedule = runtime.load_schedule("schedules/smollm2-135m-instruct_b0.3.json")
    with runtime.apply(model, schedule):
        out = model.generate(**batch, max_new_tokens=64, return_dict_in_generate=True)
    runtime.kv_bytes(runtime.cache_of(out))

This package must stay lean: it never imports calibrate, optuna, datasets or scipy. The names that need torch
and transformers load on first use, so reading a schedule stays fast.
"""

from importlib import import_module

from .schedule import Decode, ModelInfo, Schedule, ScheduleError, Selection, load_schedule

_LAZY = {
    "apply": "integration",
    "cache_of": "integration",
    "new_cache": "integration",
    "prefill_rows": "chunked_prefill",
    "mask_positions": "positions",
    "PyramidCache": "cache",
    "cache_bytes": "cache",
    "kv_bytes": "cache",
    "FAMILIES": "families",
    "UnsupportedModelError": "families",
    "model_info": "families",
}

__all__ = ["Decode", "ModelInfo", "Schedule", "ScheduleError", "Selection", "load_schedule", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
