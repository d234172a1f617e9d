"""`runtime.prefill_rows`: prefill a batch a few rows at a time, so that its prefill's working memory is a chunk's.

A prefill of B rows holds, while it runs, activations for B rows (the MLP's intermediate, a padded batch's
[B, 1, T, T] mask), one layer's full-length KV for B rows until that layer is trimmed, and the trim's scoring
buffers for B rows; only the compressed cache needs to exist for every row. Prefilled in chunks of rows, all of
that is sized for one chunk; the chunks' caches are then merged into one (`PyramidCache.cat_rows`), which holds
exactly the slots one prefill of the whole batch keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import ModelOutput

from . import integration  # (integration imports this module too: names are looked up at call time)
from .cache import PyramidCache
from .positions import mask_positions
from .schedule import describe


@torch.no_grad()  # no autograd graph: each chunk's activations go before the next (no_grad, not inference_mode:
# the cache's buffers are written in place by later decode steps, which may run outside inference mode)
def prefill_rows(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    rows: int,
    position_ids: torch.Tensor | None = None,
    logits_to_keep: int = 1,
) -> tuple[torch.Tensor, PyramidCache]:
    """Prefill `input_ids` [B, T] (left padded, `attention_mask` [B, T]) `rows` rows at a time, under
    `runtime.apply`: the logits of the last `logits_to_keep` positions [B, logits_to_keep, V] and one
    `PyramidCache` holding every row, as one call over the whole batch would give (tested token for token).

    `position_ids` default to what `generate` gives a left-padded batch: each row counts its own tokens from 0
    (from `attention_mask`; 0, 1, ... without one). Decode from the cache as after any prefill:
    `model(input_ids=next_token, attention_mask=..., position_ids=..., cache=cache)`, or prefill all but the last
    token and pass the cache to `model.generate` with the whole `input_ids` (`cache=cache`).
    """
    if not integration.is_applied(model):
        raise ValueError(
            "runtime.prefill_rows: the model is not under runtime.apply; call it inside "
            "`with runtime.apply(model, schedule):`"
        )
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"runtime.prefill_rows: rows must be a whole number >= 1, got {describe(rows)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(
            f"runtime.prefill_rows: input_ids must be a [batch, tokens] tensor with a row and a token at least, got "
            f"{_what(input_ids)}"
        )
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
            raise ValueError(
                f"runtime.prefill_rows: {name} must match input_ids' shape {tuple(input_ids.shape)}, got {_what(t)}"
            )
    if position_ids is None and attention_mask is not None:
        position_ids = mask_positions(attention_mask)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    out = in_row_chunks(
        lambda part: model(**part, logits_to_keep=logits_to_keep, use_cache=True), inputs, rows, input_ids.shape[0]
    )
    return out.logits, integration.cache_of(out)


# the inputs of a forward pass that hold one entry per row (others, like cache_position, are shared by the rows)
ROW_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")


def in_row_chunks(call: Callable[[dict], ModelOutput], inputs: dict, rows: int, batch: int) -> ModelOutput:
    """`call(inputs)` (a prefill of `batch` rows that makes a fresh `PyramidCache`) on `rows` rows at a time: the
    first chunk's output with every chunk's logits and one cache holding every row."""
    outs = []
    for start in range(0, batch, rows):
        part = {
            k: v[start : start + rows] if k in ROW_INPUTS and isinstance(v, torch.Tensor) and v.shape[0] == batch else v
            for k, v in inputs.items()
        }
        outs.append(call(part))
    out = outs[0]
    if len(outs) == 1:
        return out
    logits = torch.cat([o.logits for o in outs])
    caches = [integration.cache_of(o) for o in outs]
    for o in outs:  # only the merged cache and logits stay: each chunk's own go as the merge frees them
        o.logits = None
    out.logits = logits
    merged = PyramidCache.cat_rows(caches)
    for name in ("cache", "past_key_values"):
        if name in out.keys():
            out[name] = merged
    return out


def _what(value: object) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else describe(value)
