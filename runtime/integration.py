"""`runtime.apply(model, schedule)`: the one integration point, a context manager over a transformers model."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from . import attention, chunked_prefill, ragged_decode
from .cache import PyramidCache
from .families import check_schedule_fits, check_supported, decoder_layers, layer_plan
from .schedule import Schedule, describe, load_schedule

_IMPLEMENTATIONS = {"sdpa": attention.SDPA, "eager": attention.EAGER}


def cache_of(out) -> PyramidCache | None:
    """The cache in a model call's or `generate(..., return_dict_in_generate=True)`'s output, under either name a
    transformers release gives it: `cache` (5.25, where reading the older `past_key_values` logs a deprecation
    warning) or `past_key_values`. None when the call kept no cache."""
    keys = out.keys()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return out[name]
    return None


def is_applied(model: nn.Module) -> bool:
    """Whether `model` is inside a `runtime.apply` block."""
    return getattr(vars(model).get("forward"), "pyramid_schedule", None) is not None


def new_cache(model: nn.Module, schedule: Schedule) -> PyramidCache:
    return PyramidCache(schedule, layer_plan(model))


@contextlib.contextmanager
def apply(
    model: nn.Module,
    schedule: Schedule | str | os.PathLike,
    attn: str = "sdpa",
    ragged_kernel: bool = False,
    prefill_rows: int | None = None,
) -> Iterator[nn.Module]:
    """Make `model` keep, in each layer, only the share of the KV cache that `schedule` allows.

    `schedule` is a `runtime.Schedule` or the path of a schedule file (read with `runtime.load_schedule`, so a bad
    file raises ScheduleError); anything else raises TypeError. Inside the block, `model.generate(...)` and plain
    `model(...)` calls use a `PyramidCache`; on exit the model is exactly as it was (attention implementation,
    forward, hooks). `ragged_kernel=True` (CUDA and Triton; off until measured to pay) decodes each layer whose
    KV heads keep different shares in one Triton launch instead of one attention call per KV head.
    `prefill_rows=N`: a prefill of more than N rows (`generate`'s first pass, or a `model(...)` call without a
    cache) runs N rows at a time and returns one cache for all of them (`runtime.prefill_rows`), so its working
    memory is N rows' worth.
    """
    if isinstance(schedule, (str, os.PathLike)):
        schedule = load_schedule(schedule)
    elif not isinstance(schedule, Schedule):
        raise TypeError(
            f"runtime.apply: schedule must be a runtime.Schedule or a path to a schedule file, got "
            f"{describe(schedule)}; load one with runtime.load_schedule(path)"
        )
    check_supported(model)
    check_schedule_fits(model, schedule)
    if attn not in _IMPLEMENTATIONS:
        raise ValueError(f"attn must be one of {sorted(_IMPLEMENTATIONS)}, got {attn!r}")
    if ragged_kernel is not False:
        _check_ragged_kernel(model, ragged_kernel)
    if prefill_rows is not None and (
        isinstance(prefill_rows, bool) or not isinstance(prefill_rows, int) or prefill_rows < 1
    ):
        raise ValueError(f"prefill_rows must be None or a whole number >= 1, got {describe(prefill_rows)}")
    attention.register()
    previous_impl = model.config._attn_implementation
    had_own_forward = "forward" in vars(model)
    original_forward = model.forward
    handles = []

    @functools.wraps(original_forward)  # generate inspects forward's signature (position_ids, cache)
    def forward(*args, **kwargs):
        return _forward(model, schedule, original_forward, args, kwargs, ragged_kernel, prefill_rows)

    forward.pyramid_schedule = schedule  # how `is_applied` knows the model is under this block
    try:
        model.set_attn_implementation(_IMPLEMENTATIONS[attn])
        model.forward = forward
        if schedule.prefill_mode == "drop":
            for layer in decoder_layers(model):
                handles.append(layer.register_forward_pre_hook(_gather_inputs, with_kwargs=True))
                handles.append(layer.register_forward_hook(_gather_output, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        if had_own_forward:
            model.forward = original_forward
        else:
            vars(model).pop("forward", None)
        model.set_attn_implementation(previous_impl)


def _check_ragged_kernel(model: nn.Module, ragged_kernel: object) -> None:
    if ragged_kernel is not True:
        raise TypeError(f"ragged_kernel must be True or False, got {describe(ragged_kernel)}")
    why = ragged_decode.unavailable(next(model.parameters()).device)
    if why:
        raise ValueError(f"ragged_kernel=True {why}")


def _forward(model, schedule, original_forward, args, kwargs, ragged_kernel: bool = False, prefill_rows=None):
    if args:  # input_ids given positionally
        kwargs["input_ids"], args = args[0], args[1:]
    if kwargs.pop("use_cache", None) is False:
        raise ValueError(
            "use_cache=False would bypass the compressed cache; call the model with use_cache=True under runtime.apply"
        )
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy
    ids = kwargs.get("input_ids")
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    b, q = ref.shape[0], ref.shape[1]
    if cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
        if prefill_rows is not None and not args and b > prefill_rows:
            return _prefill_in_row_chunks(model, schedule, original_forward, kwargs, ragged_kernel, prefill_rows, b)
        cache = new_cache(model, schedule)
    elif not isinstance(cache, PyramidCache):
        raise ValueError("under runtime.apply the cache must be empty or a PyramidCache from an earlier call")
    cache.ragged_kernel = ragged_kernel
    device = ref.device
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # what the model would do itself, made explicit so the cache records it
        position_ids = (torch.arange(q, device=device) + cache.get_seq_length()).expand(b, q)
        kwargs["position_ids"] = position_ids
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        valid = mask[:, -q:].to(device=device, dtype=torch.bool)
    else:
        valid = torch.ones(b, q, dtype=torch.bool, device=device)
    cache.begin(position_ids.expand(b, q).to(device), valid)
    try:
        return original_forward(*args, cache=cache, use_cache=True, **kwargs)
    finally:
        cache.end()


def _prefill_in_row_chunks(model, schedule, original_forward, kwargs, ragged_kernel: bool, rows: int, batch: int):
    asked = [k for k in ("labels", "output_attentions", "output_hidden_states") if kwargs.get(k) not in (None, False)]
    if asked:
        raise ValueError(
            f"runtime.apply(prefill_rows={rows}): a prefill in row chunks returns logits and the cache, not "
            f"{', '.join(asked)}; leave prefill_rows unset for this call"
        )

    def one_chunk(part: dict):
        return _forward(model, schedule, original_forward, (), part, ragged_kernel)

    return chunked_prefill.in_row_chunks(one_chunk, kwargs, rows, batch)


# ---- drop mode: after a layer has planned which tokens go on, the hidden states of the others stop there


def _gather_output(module, args, kwargs, output):
    step = getattr(kwargs.get("cache"), "step", None)
    if step is None or step.forward_idx is None:
        return output
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = _gather_seq(hidden, step.forward_idx)
    step.forward_idx = None
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _gather_inputs(module, args, kwargs):
    step = getattr(kwargs.get("cache"), "step", None)
    if step is None or step.kept_idx is None:
        return None
    # the model computed rotary embeddings for every prompt token (per layer type): take the survivors' rows
    kwargs["position_embeddings"] = tuple(_gather_seq(t, step.kept_idx) for t in kwargs["position_embeddings"])
    kwargs["position_ids"] = step.q_pos
    return args, kwargs


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    t, idx = t.expand(idx.shape[0], *t.shape[1:]), idx.to(t.device)
    return torch.gather(t, 1, idx[..., None].expand(*idx.shape, t.shape[-1]))
