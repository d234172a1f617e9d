"""One layer's cache slots: keys and values with each slot's original position and validity, and the recent
queries that score them at trim time (`PyramidLayer`), plus what one forward pass adds (`Step`).

Keeping positions and validity per slot gives layers of different lengths, left padding and per-head selection
exact masks, and lets retained tokens keep their true positions for RoPE.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from . import selection
from .schedule import Schedule, kept_tokens


@dataclass
class Step:
    """What one forward pass adds: positions and validity of its query tokens (updated as drop mode gathers)."""

    q_pos: torch.Tensor  # [B, q]
    q_valid: torch.Tensor  # [B, q]
    has_invalid: bool  # python flag, so that mask-free fast paths need no device sync (a decode step: False)
    prefill: bool  # the cache was empty before this pass
    trim_now: list[bool]  # per layer: trimmed after this pass
    seen_slots: int  # positions fed so far, this pass included
    forward_idx: torch.Tensor | None = None  # drop mode: slots of this layer's input that go on [B, K]
    kept_idx: torch.Tensor | None = None  # drop mode: the same tokens as indices into the whole input [B, K]
    # masks of layers whose slots are this pass's own tokens (a fresh prompt): equal in every such layer with the same
    # window and device, so built once per pass; each is kept with the positions and validity it was built from
    masks: dict = field(default_factory=dict)


SLOT_FIELDS = ("keys", "values", "pos", "valid")  # what each slot holds


def cat_rows(target, sources: list, names: tuple[str, ...], what: str) -> None:
    """Set each attribute `names` of `target` to the rows of `sources`' same attribute, one after the other (dim 0);
    they must agree in every other dimension (`what` names the owner in the error)."""
    for name in names:
        parts = [getattr(s, name) for s in sources]
        if all(p is None for p in parts):
            continue
        shapes = {None if p is None else tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"{what}: the row chunks hold {name} of different shapes {sorted(map(str, shapes))}; chunks of one "
                "batch must be prefilled to the same length under the same schedule"
            )
        setattr(target, name, torch.cat(parts))


def _with_room(buf: torch.Tensor, used: int, need: int, spare: int) -> torch.Tensor:
    """`buf` if it holds `need` slots along dim 2, else a copy of its first `used` slots with `spare` more room."""
    if buf.shape[2] >= need:
        return buf
    grown = buf.new_empty(*buf.shape[:2], need + spare, *buf.shape[3:])
    grown[:, :, :used] = buf[:, :, :used]
    return grown


class _Slots:
    """A layer attribute that reads as the used part of a buffer with spare room along the slot axis (dim 2).

    Appending a decoded token then copies that token only, not the whole cache as `torch.cat` does; between two
    trims a layer grows by `decode.interval` slots, which is the room it gets. Assigning a tensor replaces the
    buffer (no spare room: the next append reallocates, so a forked cache never writes into a shared buffer).
    """

    def __set_name__(self, owner, name):
        self.buf = "_" + name
        self.used = self.buf + "_used"  # each buffer counts its own slots, so assignments never interfere

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        buf = layer.__dict__.get(self.buf)
        return None if buf is None else buf[:, :, : layer.__dict__[self.used]]

    def __set__(self, layer, value):
        layer.__dict__[self.buf] = value
        if value is not None:
            layer.__dict__[self.used] = value.shape[2]


def _recent_per_row(name: str) -> property:
    """[B, W] view of the last `query_window` entries of the [B, 1, T] buffer `name` (assigned as [B, W])."""

    def get(layer) -> torch.Tensor | None:
        t = getattr(layer, name)
        return None if t is None else t[:, 0, -layer.query_window :]

    def put(layer, value: torch.Tensor | None) -> None:
        setattr(layer, name, None if value is None else value[:, None])

    return property(get, put)


class _SlotStore:
    """Buffers held as `_Slots` attributes, and how to append along their slot axis."""

    def _extend(self, name: str, part: torch.Tensor, spare: int) -> None:
        """Append `part` along the slot axis of the `_Slots` attribute `name`, into its spare room if it has some."""
        d = self.__dict__
        buf, used, q = d["_" + name], d["_" + name + "_used"], part.shape[2]
        # a prompt's keys come as a fresh tensor that nothing else holds: keep it instead of copying it (checked
        # in this order so that decode steps, which always have used > 0, pay for one comparison only)
        fresh = used == 0 and spare == 0 and part._base is None and part.is_contiguous()
        if fresh and part.shape[:2] == buf.shape[:2]:
            d["_" + name], d["_" + name + "_used"] = part, q
            return
        buf = _with_room(buf, used, used + q, spare)
        buf[:, :, used : used + q] = part  # broadcasts positions and validity over the heads
        d["_" + name], d["_" + name + "_used"] = buf, used + q

    def _has_room(self, name: str, q: int) -> bool:
        d = self.__dict__
        return d["_" + name].shape[2] >= d["_" + name + "_used"] + q

    def _reserve(self, name: str, slots: int) -> None:
        """Give the `_Slots` attribute `name` room for `slots` more slots (a copy, unless it has them already)."""
        d = self.__dict__
        used = d["_" + name + "_used"]
        d["_" + name] = _with_room(d["_" + name], used, used + slots, 0)


class QueryMemory(_SlotStore):
    """The most recent queries [B, Hq, W, D], with positions and validity [B, 1, W], that score the slots at trim
    time. The owner sets `query_window` (W) and `spare` (the room each regrowth leaves)."""

    _q = _Slots()  # recent queries, with room; `q_buf` reads the last `query_window` of them
    _q_pos = _Slots()
    _q_valid = _Slots()
    QUERY_FIELDS = ("_q", "_q_pos", "_q_valid")

    # the most recent queries, to score keys when the layer is trimmed during decoding
    @property
    def q_buf(self) -> torch.Tensor | None:
        return None if self._q is None else self._q[:, :, -self.query_window :]

    @q_buf.setter
    def q_buf(self, value: torch.Tensor | None) -> None:
        self._q = value

    q_buf_pos = _recent_per_row("_q_pos")
    q_buf_valid = _recent_per_row("_q_valid")

    def remember_queries(self, query: torch.Tensor, step: Step) -> None:
        w = self.query_window
        new = {
            "_q": query[:, :, -w:],
            "_q_pos": step.q_pos[:, None, -w:].to(query.device),
            "_q_valid": step.q_valid[:, None, -w:].to(query.device),
        }
        for name, part in new.items():
            old = getattr(self, name)
            if old is None:  # clone: a view would keep the whole prompt's queries alive
                setattr(self, name, part.clone())
                continue
            if not self._has_room(name, part.shape[2]):
                setattr(self, name, old[:, :, -w:])  # older queries are never read again: regrow from the last w
            self._extend(name, part, self.spare)

    def queries_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._q, self._q_pos, self._q_valid) if t is not None)

    def keep_newest_queries(self) -> None:
        """The newest `query_window` queries become the buffers, as views with no room: the next append copies
        them instead of writing into storage that another cache (the source of a fork) still reads."""
        self.q_buf, self.q_buf_pos, self.q_buf_valid = self.q_buf, self.q_buf_pos, self.q_buf_valid

    def _index_queries(self, fn) -> None:
        for name in self.QUERY_FIELDS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


class BatchIndexing:
    """transformers' batch operations (beam reorder, row selection, repetition), each one tensor function that the
    layer's `_index_batch` applies to everything it holds per row."""

    def _index_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))


class PyramidLayer(BatchIndexing, QueryMemory, DynamicLayer):
    """One layer's cache: keys/values [B, H, T, D] plus slot positions and validity [B, H, T].

    Recent queries [B, Hq, W, D] (positions and validity [B, 1, W]) are kept to score the slots at trim time.
    """

    keys = _Slots()
    values = _Slots()
    pos = _Slots()
    valid = _Slots()

    def __init__(
        self, ratio: float, compressible: bool, sliding_window: int | None, query_window: int, spare: int = 16
    ):
        super().__init__()
        self.spare = spare  # slots of room a trimmed layer gets: the tokens it appends before the next trim
        self.ratio = ratio
        self.sliding_window = sliding_window  # the mask's limit, where the model has one
        # a sliding-window layer that is not compressed keeps its own window, like transformers' own layer
        self.is_sliding = sliding_window is not None and not compressible
        self.plan_compressible = compressible  # what the model allows, whatever the ratio
        self.compressible = compressible and ratio < 1.0
        self.scaling: float | None = None  # the attention's softmax scale, seen at the first pass
        self.query_window = query_window
        self.pos = self.valid = None
        self._q = self._q_pos = self._q_valid = None
        self.has_invalid = False
        self.shared_slots = True  # every head holds the same tokens (no per-head selection happened yet)

    @property
    def top_ratio(self) -> float:
        """The largest share any head keeps: what drop mode must let through to this layer."""
        return self.ratio

    def units(self) -> list[PyramidLayer]:
        """The parts that keep their own tokens: the layer itself (a `RaggedLayer`: one per KV head)."""
        return [self]

    def parts(self, query: torch.Tensor) -> list[tuple[PyramidLayer, torch.Tensor]]:
        """Each unit with the queries [B, Hq', q, D] that attend to it."""
        return [(self, query)]

    def settle(self) -> None:
        """After trims: nothing to do for a layer that keeps its own buffers (`RaggedLayer` repacks)."""

    def queries(self) -> QueryMemory:
        """The layer's recent queries, every query head."""
        return self

    # ---- transformers interface

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.pos = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.valid = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def room(self, need: int) -> int:
        # a layer that is trimmed regrows by the interval; one that is not grows geometrically, so appends stay cheap
        return self.spare if self.compressible else max(self.spare, need // 16)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # no room after a prompt: the cache is measured (and may be kept) as it stands; decoding adds room
        spare = 0 if step.prefill else self.room(self.stored() + key_states.shape[2])
        self._extend("keys", key_states, spare)
        self._extend("values", value_states, spare)
        # .to(): with a model split over devices (device_map) a layer's cache lives on that layer's device
        self._extend("pos", step.q_pos.to(self.device)[:, None, :], spare)
        self._extend("valid", step.q_valid.to(self.device)[:, None, :], spare)
        self.has_invalid = self.has_invalid or step.has_invalid

    def stored(self) -> int:
        return 0 if self.keys is None else self.__dict__["_keys_used"]

    def reserve(self, slots: int) -> None:
        """Room for `slots` more slots in every slot buffer, allocated now (see `PyramidCache.reserve`)."""
        if self.keys is not None:
            for name in SLOT_FIELDS:
                self._reserve(name, slots)

    def kv_nbytes(self) -> int:
        """Bytes allocated for keys and values, spare room included."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values) if t is not None)

    def slot_nbytes(self) -> int:
        """Bytes allocated for slot positions and validity."""
        return sum(t.numel() * t.element_size() for t in (self._pos, self._valid) if t is not None)

    def bookkeeping_nbytes(self) -> int:
        """Bytes allocated for slot positions, validity and the recent queries."""
        return self.slot_nbytes() + self.queries_nbytes()

    get_seq_length = stored  # slots held; the cache itself answers with tokens seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.pos = self.valid = self.q_buf = self.q_buf_pos = self.q_buf_valid = None
        self.has_invalid = False
        self.shared_slots = True

    @classmethod
    def cat_rows(cls, layers: list[PyramidLayer], what: str = "layer", queries: bool = True) -> PyramidLayer:
        """One layer holding the rows of `layers` (the same layer of caches prefilled alike), one after the other;
        its recent queries too unless `queries` is False (a split layer's heads read views of the layer's ring)."""
        out = copy.copy(layers[0])
        cat_rows(out, layers, SLOT_FIELDS + (cls.QUERY_FIELDS if queries else ()), what)
        out.has_invalid = any(layer.has_invalid for layer in layers)
        out.shared_slots = all(layer.shared_slots for layer in layers)
        return out

    def _index_slots(self, fn) -> None:
        for name in SLOT_FIELDS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def _index_batch(self, fn) -> None:
        self._index_slots(fn)
        self._index_queries(fn)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back to an earlier length")

    # ---- masks

    def window_overflows(self, step: Step) -> bool:
        """Whether the sliding window may cut: some slot may lie beyond it once more tokens were seen than it spans
        (slots != positions)."""
        return self.sliding_window is not None and step.seen_slots > self.sliding_window

    def attention_mask(self, step: Step, num_query_heads: int) -> torch.Tensor | None:
        """Boolean mask [B, 1 or Hq, q, T] for this layer's stored slots, or None where plain causal is exact."""
        q = step.q_pos.shape[1]
        t = self.stored()
        fresh = step.prefill and t == q and self.shared_slots  # the slots are this pass's tokens, as they came
        if not (self.has_invalid or step.has_invalid or self.window_overflows(step)):
            if q == 1 or fresh:
                return None  # exactly what stock SDPA does: no mask for one token, is_causal for a fresh prompt
        key = (self.sliding_window, self.device)
        if fresh:
            built = step.masks.get(key)
            if built is not None and built[0] is step.q_pos and built[1] is step.q_valid:
                return built[2]
        pos, valid = (self.pos[:, :1], self.valid[:, :1]) if self.shared_slots else (self.pos, self.valid)
        qp = step.q_pos.to(self.device)[:, None, :, None]
        mask = valid[:, :, None, :] & (pos[:, :, None, :] <= qp)
        if self.sliding_window is not None:
            mask = mask & (qp - pos[:, :, None, :] < self.sliding_window)
        # a padded query row that sees nothing would turn into NaN and poison later layers: let it see all
        mask = mask | ~step.q_valid.to(self.device)[:, None, :, None]
        if mask.shape[1] > 1 and mask.shape[1] != num_query_heads:
            mask = mask.repeat_interleave(num_query_heads // mask.shape[1], dim=1)
        if fresh:  # [B, 1, q, T] whatever the heads: one mask serves every fresh layer of this pass
            step.masks[key] = (step.q_pos, step.q_valid, mask)
        return mask

    # ---- compression

    def scores(self, schedule: Schedule, scaling: float, queries: int | None = None) -> torch.Tensor:
        """Recent-window attention over the stored slots, [B, H, T], pooled as the schedule says.

        queries: score with only the newest `queries` remembered queries (calibration compares window sizes)."""
        sel = schedule.selection
        if sel.method == "recent":  # StreamingLLM: the newest tokens win (sinks are protected anyway)
            return torch.cumsum(self.valid.to(torch.float32), dim=-1)
        if sel.method == "random":  # a floor for comparisons; seeded by position so runs repeat
            g = torch.sin(self.pos.to(torch.float64) * 12.9898 + 78.233) * 43758.5453
            return (g - torch.floor(g)).to(torch.float32)
        q, q_pos, q_valid = self.q_buf, self.q_buf_pos, self.q_buf_valid
        if queries is not None:
            q, q_pos, q_valid = q[:, :, -queries:], q_pos[:, -queries:], q_valid[:, -queries:]
        weights = selection.query_weights(q.shape[2], sel.query_weighting, sel.weight_max, self.device)
        s = selection.recent_attention(
            q,
            q_pos,
            q_valid,
            self.keys,
            self.pos,
            self.valid,
            scaling,
            weights,
            all_valid=not self.has_invalid,
        )
        return selection.pool(s, self.valid if self.has_invalid else None, sel.pooling, sel.pool_kernel)

    def keep_only(self, idx: torch.Tensor, kept: torch.Tensor) -> None:
        """Physically shrink the layer to the slots `idx` [B, 1 or H, K]; `kept` marks the real ones."""
        self.keys = selection.gather_tokens(self.keys, idx)
        self.values = selection.gather_tokens(self.values, idx)
        self.pos = selection.gather_tokens(self.pos, idx)
        self.valid = selection.gather_tokens(self.valid, idx) & kept.expand_as(self.pos)
        self.shared_slots = self.shared_slots and idx.shape[1] == 1

    def trim_window(self) -> None:
        """A sliding-window layer keeps only what its next query can still see, like transformers' own."""
        keep = self.sliding_window - 1
        if self.stored() > keep:
            self.keys, self.values = self.keys[:, :, -keep:].clone(), self.values[:, :, -keep:].clone()
            self.pos, self.valid = self.pos[..., -keep:].clone(), self.valid[..., -keep:].clone()

    def due(self, schedule: Schedule, seen_slots: int, trim_now: bool) -> int | None:
        """Slots to keep if the layer is trimmed now, else None."""
        if not (self.compressible and trim_now):
            return None
        k_max = kept_tokens(self.ratio, seen_slots, schedule.sinks, schedule.window)
        if schedule.decode.max_tokens is not None:
            k_max = min(k_max, schedule.decode.max_tokens)
        return k_max if self.stored() > k_max else None

    def trim(
        self,
        scores: torch.Tensor,
        schedule: Schedule,
        seen_valid: torch.Tensor | None,
        k_max: int,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Keep the k_max best slots per row (and head); `keep` [B] or [B, H] overrides the layer's own counts."""
        if keep is None:
            keep = selection.kept_counts(
                self.ratio, seen_valid, schedule.sinks, schedule.window, schedule.decode.max_tokens
            )
        elif keep.dim() > 1:  # heads below the largest count hold surplus slots: every mask must see validity
            self.has_invalid = True
        if schedule.selection.per_head:
            valid = self.valid
        else:
            scores, valid = scores.mean(1, keepdim=True), self.valid[:, :1]
        protect = selection.protected_mask(valid, schedule.sinks, schedule.window)
        idx, kept = selection.choose(scores, valid, protect, keep, k_max)
        self.keep_only(idx, kept)
