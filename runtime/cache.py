"""A transformers `Cache` whose layers each keep their own share of the tokens.

Every layer stores, besides keys and values, the original position and a validity flag of each slot, so that
layers of different lengths, left padding and per-head selection all get exact masks, and retained tokens keep
their true positions for RoPE.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import selection
from .schedule import Schedule, describe, kept_tokens


@dataclass
class Step:
    """What one forward pass adds: positions and validity of its query tokens (updated as drop mode gathers)."""

    q_pos: torch.Tensor  # [B, q]
    q_valid: torch.Tensor  # [B, q]
    has_invalid: bool  # python flag, so that mask-free fast paths need no device sync
    prefill: bool  # the cache was empty before this pass
    trim_now: list[bool]  # per layer: trimmed after this pass
    seen_slots: int  # positions fed so far, this pass included
    forward_idx: torch.Tensor | None = None  # drop mode: slots of this layer's input that go on [B, K]
    kept_idx: torch.Tensor | None = None  # drop mode: the same tokens as indices into the whole input [B, K]


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


class PyramidLayer(DynamicLayer):
    """One layer's cache: keys/values [B, H, T, D] plus slot positions and validity [B, H, T].

    Recent queries [B, Hq, W, D] (positions and validity [B, 1, W]) are kept to score the slots at trim time.
    """

    keys = _Slots()
    values = _Slots()
    pos = _Slots()
    valid = _Slots()
    _q = _Slots()  # recent queries, with room; `q_buf` reads the last `query_window` of them
    _q_pos = _Slots()
    _q_valid = _Slots()

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

    # the most recent queries, to score keys when the layer is trimmed during decoding
    @property
    def q_buf(self) -> torch.Tensor | None:
        return None if self._q is None else self._q[:, :, -self.query_window :]

    @q_buf.setter
    def q_buf(self, value: torch.Tensor | None) -> None:
        self._q = value

    q_buf_pos = _recent_per_row("_q_pos")
    q_buf_valid = _recent_per_row("_q_valid")

    # ---- transformers interface

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h = key_states.shape[:2]
        self.keys = key_states.new_empty(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.pos = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.valid = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def _room(self, need: int) -> int:
        # a layer that is trimmed regrows by the interval; one that is not grows geometrically, so appends stay cheap
        return self.spare if self.compressible else max(self.spare, need // 16)

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

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # no room after a prompt: the cache is measured (and may be kept) as it stands; decoding adds room
        spare = 0 if step.prefill else self._room(self.stored() + key_states.shape[2])
        self._extend("keys", key_states, spare)
        self._extend("values", value_states, spare)
        # .to(): with a model split over devices (device_map) a layer's cache lives on that layer's device
        self._extend("pos", step.q_pos.to(self.device)[:, None, :], spare)
        self._extend("valid", step.q_valid.to(self.device)[:, None, :], spare)
        self.has_invalid = self.has_invalid or step.has_invalid

    def stored(self) -> int:
        return 0 if self.keys is None else self.__dict__["_keys_used"]

    def kv_nbytes(self) -> int:
        """Bytes allocated for keys and values, spare room included."""
        return sum(t.numel() * t.element_size() for t in (self._keys, self._values) if t is not None)

    def bookkeeping_nbytes(self) -> int:
        """Bytes allocated for slot positions, validity and the recent queries."""
        held = (self._pos, self._valid, self._q, self._q_pos, self._q_valid)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    get_seq_length = stored  # slots held; the cache itself answers with tokens seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.pos = self.valid = self.q_buf = self.q_buf_pos = self.q_buf_valid = None
        self.has_invalid = False
        self.shared_slots = True

    def _index_batch(self, fn) -> None:
        for name in ("keys", "values", "pos", "valid", "_q", "_q_pos", "_q_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

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
        if not (self.has_invalid or step.has_invalid or self.window_overflows(step)):
            if q == 1 or (step.prefill and t == q and self.shared_slots):
                return None  # exactly what stock SDPA does: no mask for one token, is_causal for a fresh prompt
        pos, valid = (self.pos[:, :1], self.valid[:, :1]) if self.shared_slots else (self.pos, self.valid)
        qp = step.q_pos.to(self.device)[:, None, :, None]
        mask = valid[:, :, None, :] & (pos[:, :, None, :] <= qp)
        if self.sliding_window is not None:
            mask = mask & (qp - pos[:, :, None, :] < self.sliding_window)
        # a padded query row that sees nothing would turn into NaN and poison later layers: let it see all
        mask = mask | ~step.q_valid.to(self.device)[:, None, :, None]
        if mask.shape[1] > 1 and mask.shape[1] != num_query_heads:
            mask = mask.repeat_interleave(num_query_heads // mask.shape[1], dim=1)
        return mask

    # ---- compression

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


class RaggedLayer(DynamicLayer):
    """A layer whose KV heads keep different shares: one single-head `PyramidLayer` per KV head.

    In one [B, H, T, D] tensor a head that keeps fewer tokens than its neighbours could only mask its surplus
    slots, which would still take memory; split into heads, each holds exactly its own tokens, and attention runs
    once per KV head with that head's group of queries.
    """

    is_sliding = False
    compressible = plan_compressible = True

    def __init__(self, heads: list[PyramidLayer]):
        super().__init__()
        self.heads = heads  # each head trims, scores and masks itself; the layer only dispatches

    @classmethod
    def new(cls, ratios: list[float], sliding_window: int | None, query_window: int, spare: int) -> RaggedLayer:
        return cls([PyramidLayer(r, True, sliding_window, query_window, spare) for r in ratios])

    @classmethod
    def split(cls, layer: PyramidLayer, ratios: list[float]) -> RaggedLayer:
        """Views of each KV head of a filled `layer` (copies nothing), each to keep its own share."""
        if not layer.shared_slots:
            raise ValueError("only a layer whose heads hold the same tokens can be split by head")
        group = layer.q_buf.shape[1] // len(ratios) if layer.q_buf is not None else 0
        heads = []
        for h, r in enumerate(ratios):
            head = copy.copy(layer)
            head.__dict__.update(ratio=r, compressible=r < 1.0)
            head.keys, head.values = layer.keys[:, h : h + 1], layer.values[:, h : h + 1]
            head.pos, head.valid = layer.pos[:, h : h + 1], layer.valid[:, h : h + 1]
            head.q_buf = None if layer.q_buf is None else layer.q_buf[:, h * group : (h + 1) * group]
            head.q_buf_pos, head.q_buf_valid = layer.q_buf_pos, layer.q_buf_valid
            heads.append(head)
        ragged = cls(heads)
        ragged.is_initialized, ragged.device = True, layer.device
        return ragged

    @property
    def top_ratio(self) -> float:
        return max(h.ratio for h in self.heads)

    @property
    def has_invalid(self) -> bool:
        return any(h.has_invalid for h in self.heads)

    def units(self) -> list[PyramidLayer]:
        return self.heads

    def parts(self, query: torch.Tensor) -> list[tuple[PyramidLayer, torch.Tensor]]:
        g = query.shape[1] // len(self.heads)
        return [(head, query[:, i * g : (i + 1) * g]) for i, head in enumerate(self.heads)]

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        self.is_initialized, self.device = True, key_states.device
        for i, head in enumerate(self.heads):
            head.append(key_states[:, i : i + 1], value_states[:, i : i + 1], step)

    def stored(self) -> int:
        return max(h.stored() for h in self.heads)

    get_seq_length = stored

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0

    def kv_nbytes(self) -> int:
        return sum(h.kv_nbytes() for h in self.heads)

    def bookkeeping_nbytes(self) -> int:
        return sum(h.bookkeeping_nbytes() for h in self.heads)

    def reset(self) -> None:
        super().reset()
        for h in self.heads:
            h.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for h in self.heads:
            h.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for h in self.heads:
            h.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for h in self.heads:
            h.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back to an earlier length")


AnyLayer = PyramidLayer | RaggedLayer


def _forked(layer: PyramidLayer, ratio: float, schedule: Schedule) -> PyramidLayer:
    """A copy of `layer` that shares its tensors and keeps `ratio` under `schedule`."""
    out = copy.copy(layer)
    out.ratio = ratio
    out.compressible = ratio < 1.0 and not out.is_sliding and out.plan_compressible
    out.query_window = schedule.window
    out.spare = schedule.decode.interval
    # the views become the buffers: no spare room, so the fork's first append copies instead of writing into
    # storage that the source cache (or another fork) still uses
    out.keys, out.values, out.pos, out.valid = out.keys, out.values, out.pos, out.valid
    out.q_buf, out.q_buf_pos, out.q_buf_valid = out.q_buf, out.q_buf_pos, out.q_buf_valid
    return out


class PyramidCache(Cache):
    """The KV cache used under `runtime.apply`: one `PyramidLayer` per decoder layer."""

    def __init__(self, schedule: Schedule, plan: list[tuple[bool, int | None]]):
        """`plan` holds, per layer, whether it may be compressed and its sliding window (or None)."""
        layers: list[AnyLayer] = []
        for i, (r, (c, w)) in enumerate(zip(schedule.ratios, plan, strict=True)):
            heads = schedule.layer_head_ratios(i)
            if c and heads is not None:
                layers.append(RaggedLayer.new(heads, w, schedule.window, schedule.decode.interval))
            else:
                layers.append(PyramidLayer(r, c, w, schedule.window, schedule.decode.interval))
        super().__init__(layers=layers)
        self.schedule = schedule
        self.seen_slots = 0  # positions fed so far, pads included: what generate slices its input by
        self.seen_valid: torch.Tensor | None = None  # [B] real tokens fed so far per row
        self.step: Step | None = None
        self.since_trim = [0] * len(self.layers)  # per layer: tokens fed since its last trim
        self.ragged_kernel = False  # decode split layers in one kernel launch (`runtime.apply(..., ragged_kernel=)`)
        # drop mode: after layer l only the tokens some deeper layer may keep go on; its largest share decides
        # (uncompressed full-attention layers need every token; sliding layers make do with what they get)
        need = [lay.top_ratio if lay.compressible else (None if lay.is_sliding else 1.0) for lay in self.layers]
        self.forward_ratio = []
        for i in range(len(need)):
            deeper = [r for r in need[i + 1 :] if r is not None]
            self.forward_ratio.append(max(deeper) if deeper else None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_slots

    def begin(self, q_pos: torch.Tensor, q_valid: torch.Tensor) -> None:
        """Called once per forward pass, before the first layer."""
        has_invalid = bool((~q_valid).any())  # one host sync per forward, never per layer
        prefill = self.seen_slots == 0
        q = q_pos.shape[1]
        self.step = Step(
            q_pos=q_pos,
            q_valid=q_valid,
            has_invalid=has_invalid,
            prefill=prefill,
            trim_now=self._trims_due(prefill, q),
            seen_slots=self.seen_slots + q,
        )
        added = q_valid.sum(-1)
        self.seen_valid = added if self.seen_valid is None else self.seen_valid + added
        self.seen_slots += q_pos.shape[1]

    def _trims_due(self, prefill: bool, fed: int) -> list[bool]:
        """Per layer, whether it trims after this pass: right after prefill, then once every `decode.interval` fed
        tokens. Counting fed tokens (not the excess over a target) makes the moments the same for a row alone and
        in a padded batch, so its output does not depend on its neighbours; the scoring cost is paid once per
        interval. With `decode.stagger` layer i starts i * interval // L tokens into its interval."""
        interval, layers = self.schedule.decode.interval, len(self.layers)
        if prefill:
            stagger = self.schedule.decode.stagger
            self.since_trim = [i * interval // layers if stagger else 0 for i in range(layers)]
            return [True] * layers
        due = []
        for i in range(layers):
            self.since_trim[i] += fed
            due.append(self.since_trim[i] >= interval)
            if due[-1]:
                self.since_trim[i] = 0
        return due

    def end(self) -> None:
        self.step = None

    def update(self, key_states, value_states, layer_idx: int, *args, kwargs=None, **extra):
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, self.step)
        if kwargs is not None:
            # the attention function receives this same dict: it is how it finds the layer and the step
            kwargs["pyramid"] = (self, layer_idx)
        if isinstance(layer, RaggedLayer):  # the attention function reads each head's own buffers
            return key_states, value_states
        return layer.keys, layer.values

    def after_attention(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Remember the recent queries, then trim the layer (and, in drop mode, plan what goes on)."""
        layer, step, schedule = self.layers[layer_idx], self.step, self.schedule
        parts = layer.parts(query)
        for unit, q in parts:
            unit.scaling = scaling  # a plain layer is its own one unit
            unit.remember_queries(q, step)
        due = [unit.due(schedule, self.seen_slots, step.trim_now[layer_idx]) for unit, _ in parts]
        m_max = self._forward_due(layer_idx)
        if m_max is not None or any(k is not None for k in due):
            scores = [unit.scores(schedule, scaling) for unit, _ in parts]
            if m_max is not None:  # scored over all of this pass's tokens (every head holds them), before any cut
                self._plan_forward(layer_idx, torch.cat(scores, 1).mean(1, keepdim=True), m_max)
            for (unit, _), s, k_max in zip(parts, scores, due, strict=True):
                if k_max is not None:
                    unit.trim(s, schedule, self.seen_valid.to(unit.device), k_max)
        if layer.is_sliding:
            layer.trim_window()

    def _forward_due(self, layer_idx: int) -> int | None:
        ratio = self.forward_ratio[layer_idx]
        step = self.step
        if self.schedule.prefill_mode != "drop" or not step.prefill or ratio is None or ratio >= 1.0:
            return None
        m_max = kept_tokens(ratio, self.seen_slots, self.schedule.sinks, self.schedule.window)
        return m_max if m_max < step.q_pos.shape[1] else None

    def _plan_forward(self, layer_idx: int, scores: torch.Tensor, m_max: int) -> None:
        step, s = self.step, self.schedule
        dev = scores.device
        step.q_pos, step.q_valid = step.q_pos.to(dev), step.q_valid.to(dev)
        if step.kept_idx is not None:
            step.kept_idx = step.kept_idx.to(dev)
        valid = step.q_valid[:, None, :]
        keep = selection.kept_counts(self.forward_ratio[layer_idx], self.seen_valid.to(dev), s.sinks, s.window)
        idx, kept = selection.choose(scores, valid, selection.protected_mask(valid, s.sinks, s.window), keep, m_max)
        step.forward_idx = idx[:, 0]
        step.kept_idx = idx[:, 0] if step.kept_idx is None else torch.gather(step.kept_idx, 1, idx[:, 0])
        step.q_pos = torch.gather(step.q_pos, 1, step.forward_idx)
        # without padding every row keeps all m_max slots, so has_invalid stays as it was
        step.q_valid = torch.gather(step.q_valid, 1, step.forward_idx) & kept[:, 0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid.index_select(0, beam_idx.to(self.seen_valid.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seen_valid is not None:
            self.seen_valid = self.seen_valid.repeat_interleave(repeats, dim=0)

    def fork(self, schedule: Schedule) -> PyramidCache:
        """A new cache under `schedule` that starts from this one's contents (shares tensors, copies nothing).

        Calibration prefills once with an all-ones schedule and a wide query window, then forks that cache for
        every candidate schedule and calls `compress_now`: evict mode needs no second prefill. Evaluation forks a
        compressed cache to score one continuation and generate another from the same state; a layer already
        split by head stays split, each head forked alone.
        """
        other = PyramidCache.__new__(PyramidCache)
        layers = []
        for i, layer in enumerate(self.layers):
            heads = schedule.layer_head_ratios(i)
            if isinstance(layer, RaggedLayer):
                shares = heads or [schedule.ratios[i]] * len(layer.heads)
                if len(shares) != len(layer.heads):
                    raise ValueError(f"layer {i} holds {len(layer.heads)} KV heads, the schedule gives {len(shares)}")
                forked = RaggedLayer([_forked(u, r, schedule) for u, r in zip(layer.heads, shares, strict=True)])
                forked.is_initialized, forked.device = layer.is_initialized, layer.device
            else:
                forked = _forked(layer, schedule.ratios[i], schedule)
                if heads is not None and forked.compressible:
                    forked = RaggedLayer.split(forked, heads)
            layers.append(forked)
        Cache.__init__(other, layers=layers)
        other.schedule = schedule
        other.seen_slots, other.seen_valid, other.step = self.seen_slots, self.seen_valid, None
        other.since_trim = [0] * len(other.layers)
        other.ragged_kernel = self.ragged_kernel
        other.forward_ratio = [None] * len(other.layers)
        return other

    def compress_now(self) -> None:
        """Trim every layer to its share of the tokens seen so far, as right after a prefill."""
        for unit in (u for layer in self.layers for u in layer.units()):
            k_max = unit.due(self.schedule, self.seen_slots, trim_now=True)
            if k_max is not None:
                unit.trim(unit.scores(self.schedule, unit.scaling), self.schedule, self.seen_valid, k_max)

    def stored_lengths(self) -> list[int]:
        return [layer.stored() for layer in self.layers]


def _expect_cache(cache: object, caller: str) -> None:
    # anything without cache layers used to count as 0 bytes: a wrong argument read as an empty cache
    if not isinstance(cache, Cache):
        raise TypeError(
            f"runtime.{caller}: expected a transformers Cache (such as a PyramidCache), got {describe(cache)}; pass "
            "out.past_key_values from model.generate(..., return_dict_in_generate=True) or from a model(...) call"
        )


def kv_bytes(cache: Cache) -> int:
    """Bytes the cache really holds in keys and values, spare room included (any transformers Cache)."""
    _expect_cache(cache, "kv_bytes")
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, AnyLayer):
            total += layer.kv_nbytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_bytes(cache: Cache) -> int:
    """All bytes the cache holds: keys, values and our per-slot bookkeeping (positions, validity, recent queries)."""
    _expect_cache(cache, "cache_bytes")
    extra = sum(layer.bookkeeping_nbytes() for layer in getattr(cache, "layers", []) if isinstance(layer, AnyLayer))
    return kv_bytes(cache) + extra
