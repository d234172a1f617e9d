"""A layer whose KV heads keep different shares of the tokens (`RaggedLayer`): one single-head unit per KV head.

While decoding, the heads' keys, values, positions and validity live in one flat buffer per field, [B, S, ...],
each head a segment of it with room for the tokens it appends before its next trim: a decode step then writes
every head's new slot with one `index_copy_` per field (a device-side write index, no host work per head), where
separate buffers took one copy per head and field. Each head reads its segment as its own [B, 1, T, ...] view,
so masks, trims and attention are those of a single-head `PyramidLayer`.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicLayer

from . import ragged_decode
from .layer import SLOT_FIELDS as FIELDS  # what each slot holds, one flat buffer each
from .layer import BatchIndexing, PyramidLayer, QueryMemory, Step, cat_rows


class QueryRing(QueryMemory):
    """A split layer's recent queries, all query heads in one ring: each head reads its group's view of it."""

    def __init__(self, query_window: int, spare: int):
        self.query_window, self.spare = query_window, spare
        self._q = self._q_pos = self._q_valid = None

    @classmethod
    def of(cls, source: QueryMemory, query_window: int, spare: int) -> QueryRing:
        """A ring holding `source`'s newest `query_window` queries as views (no room: its first append copies)."""
        ring = cls(query_window, spare)
        ring._q, ring._q_pos, ring._q_valid = source._q, source._q_pos, source._q_valid
        ring.keep_newest_queries()
        return ring


class RaggedLayer(BatchIndexing, DynamicLayer):
    """A layer whose KV heads keep different shares: one single-head `PyramidLayer` per KV head.

    In one [B, H, T, D] tensor a head that keeps fewer tokens than its neighbours could only mask its surplus
    slots, which would still take memory; split into heads, each holds exactly its own tokens, and attention runs
    once per KV head with that head's group of queries.
    """

    is_sliding = False
    compressible = plan_compressible = True
    flat = True  # decode into flat buffers; False appends head by head (the simple path the tests compare with)

    def __init__(self, heads: list[PyramidLayer], ring: QueryRing | None = None):
        super().__init__()
        self.heads = heads  # each head trims, scores and masks itself; the layer only dispatches
        # the recent queries are remembered once per layer; each head reads its query group's view of them
        self.ring = ring if ring is not None else QueryRing(heads[0].query_window, heads[0].spare)
        self._share_ring()
        # the flat buffers, the segment views each head got from them (a head whose buffers are no longer these,
        # after a trim or a batch reorder, has left the flat storage) and each head's next free slot [H]
        self._flat: dict[str, torch.Tensor] | None = None
        self._views: list[tuple[torch.Tensor, ...]] = []
        self._next: torch.Tensor | None = None

    @classmethod
    def new(cls, ratios: list[float], sliding_window: int | None, query_window: int, spare: int) -> RaggedLayer:
        return cls([PyramidLayer(r, True, sliding_window, query_window, spare) for r in ratios])

    @classmethod
    def split(cls, layer: PyramidLayer, ratios: list[float]) -> RaggedLayer:
        """Views of each KV head of a filled `layer` (copies nothing), each to keep its own share."""
        if not layer.shared_slots:
            raise ValueError("only a layer whose heads hold the same tokens can be split by head")
        heads = []
        for h, r in enumerate(ratios):
            head = copy.copy(layer)
            head.__dict__.update(ratio=r, compressible=r < 1.0)
            head.keys, head.values = layer.keys[:, h : h + 1], layer.values[:, h : h + 1]
            head.pos, head.valid = layer.pos[:, h : h + 1], layer.valid[:, h : h + 1]
            heads.append(head)
        ragged = cls(heads, QueryRing.of(layer, layer.query_window, layer.spare))
        ragged.is_initialized, ragged.device = True, layer.device
        return ragged

    @classmethod
    def cat_rows(cls, layers: list[RaggedLayer], what: str = "layer") -> RaggedLayer:
        """One layer holding the rows of `layers` (the same layer of caches prefilled alike), one after the other."""
        if len({len(layer.heads) for layer in layers}) > 1:
            raise ValueError(f"{what}: the row chunks split it into different numbers of KV heads")
        heads = [
            PyramidLayer.cat_rows([layer.heads[h] for layer in layers], f"{what}, KV head {h}", queries=False)
            for h in range(len(layers[0].heads))
        ]
        ring = QueryRing(layers[0].ring.query_window, layers[0].ring.spare)
        cat_rows(ring, [layer.ring for layer in layers], QueryRing.QUERY_FIELDS, f"{what}, recent queries")
        out = cls(heads, ring)
        out.is_initialized, out.device = layers[0].is_initialized, layers[0].device
        return out

    @property
    def top_ratio(self) -> float:
        return max(h.ratio for h in self.heads)

    @property
    def has_invalid(self) -> bool:
        return any(h.has_invalid for h in self.heads)

    def units(self) -> list[PyramidLayer]:
        return self.heads

    @property
    def query_window(self) -> int:
        return self.ring.query_window

    def queries(self) -> QueryRing:
        """The layer's recent queries, every query head."""
        return self.ring

    def remember_queries(self, query: torch.Tensor, step: Step) -> None:
        self.ring.remember_queries(query, step)
        self._share_ring()

    def _share_ring(self) -> None:
        """Point each head's recent queries at its query group's view of the ring (no copy)."""
        q, pos, valid = self.ring._q, self.ring._q_pos, self.ring._q_valid
        if q is None:
            return
        g = q.shape[1] // len(self.heads)
        for i, head in enumerate(self.heads):
            head._q, head._q_pos, head._q_valid = q[:, i * g : (i + 1) * g], pos, valid

    def parts(self, query: torch.Tensor) -> list[tuple[PyramidLayer, torch.Tensor]]:
        g = query.shape[1] // len(self.heads)
        return [(head, query[:, i * g : (i + 1) * g]) for i, head in enumerate(self.heads)]

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        self.is_initialized, self.device = True, key_states.device
        if step.prefill or not self.flat:  # a prompt is kept as it comes (each head its own slice), no room
            self._flat, self._views = None, []  # heads append on their own from here (into their segments' room)
            for i, head in enumerate(self.heads):
                head.append(key_states[:, i : i + 1], value_states[:, i : i + 1], step)
            return
        q = key_states.shape[2]
        if not self._has_room(q):
            self._pack(q)
        self._append_flat(key_states, value_states, step)

    def _in_flat(self) -> bool:
        """Whether every head still reads the flat buffers (a trim or a batch reorder gives a head its own)."""
        if self._flat is None:
            return False
        return all(
            head.__dict__["_" + f] is v
            for head, views in zip(self.heads, self._views, strict=True)
            for f, v in zip(FIELDS, views, strict=True)
        )

    def _has_room(self, q: int) -> bool:
        if not self._in_flat():
            return False
        return all(h.__dict__["_keys_used"] + q <= views[0].shape[2] for h, views in zip(self.heads, self._views))

    def settle(self) -> None:
        """After trims: heads that trimmed hold buffers of their own while the others, and the layer, still hold the
        old flat buffers; pack again now (as the next step would) so those are freed at once and `kv_bytes` counts
        what is really held."""
        if self._flat is not None and not self._in_flat():
            self._pack(1)

    def kernel_inputs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For `ragged_decode`: the heads' address table and lengths [H] on the device, kept between steps while
        the heads read the flat buffers; (None, None) when they do not."""
        if not self._in_flat():
            return None, None
        return self._table, self._next - self._starts

    def _pack(self, q: int) -> None:
        """Copy every head's slots into new flat buffers, each head's segment with the room it grows by."""
        heads = self.heads
        used = [h.stored() for h in heads]
        caps = [n + q + h.room(n + q) for h, n in zip(heads, used, strict=True)]
        starts = [sum(caps[:i]) for i in range(len(caps))]
        flat, views = {}, [[] for _ in heads]
        for f in FIELDS:
            parts = [getattr(h, f) for h in heads]  # [B, 1, n, ...] each
            buf = parts[0].new_empty(parts[0].shape[0], sum(caps), *parts[0].shape[3:])
            for i, (part, start, cap) in enumerate(zip(parts, starts, caps, strict=True)):
                buf[:, start : start + used[i]] = part[:, 0]
                views[i].append(buf[:, None, start : start + cap])
            flat[f] = buf
        for head, n, vs in zip(heads, used, views, strict=True):
            for f, v in zip(FIELDS, vs, strict=True):
                head.__dict__["_" + f], head.__dict__["_" + f + "_used"] = v, n
        self._flat, self._views = flat, [tuple(v) for v in views]
        self._starts = torch.tensor(starts, device=self.device)
        self._next = self._starts + torch.tensor(used, device=self.device)
        keys, values, pos, valid = zip(*self._views)
        self._table = ragged_decode.head_table(keys, values, valid) if keys[0].stride(-1) == 1 else None

    def _append_flat(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        """Write the step's slots of every head at once: one index_copy_ per field into the flat buffers."""
        b, h, q = key_states.shape[:3]
        idx = self._next if q == 1 else (self._next[:, None] + torch.arange(q, device=self.device)).flatten()
        flat = self._flat
        flat["keys"].index_copy_(1, idx, key_states.reshape(b, h * q, -1))
        flat["values"].index_copy_(1, idx, value_states.reshape(b, h * q, -1))
        # every head gets the same positions and validity: [B, q] head-major, as idx is (a broadcast view for one
        # token: `repeat` would cost more than the copy itself)
        for f, part in (("pos", step.q_pos), ("valid", step.q_valid)):
            part = part.to(self.device)
            part = part.expand(b, h) if q == 1 else part[:, None].expand(b, h, q).reshape(b, h * q)
            flat[f].index_copy_(1, idx, part)
        self._next += q
        for head in self.heads:
            d = head.__dict__
            for f in FIELDS:
                d["_" + f + "_used"] += q
            head.has_invalid = head.has_invalid or step.has_invalid

    def stored(self) -> int:
        return max(h.stored() for h in self.heads)

    get_seq_length = stored

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored() + query_length, 0

    def kv_nbytes(self) -> int:
        return sum(h.kv_nbytes() for h in self.heads)

    def bookkeeping_nbytes(self) -> int:
        return sum(h.slot_nbytes() for h in self.heads) + self.ring.queries_nbytes()

    def reset(self) -> None:
        self._flat, self._views, self._next = None, [], None  # each head gets buffers of its own
        super().reset()
        for h in self.heads:
            h.reset()
        self.ring = QueryRing(self.ring.query_window, self.ring.spare)

    def _index_batch(self, fn) -> None:
        self._flat, self._views, self._next = None, [], None  # each head gets buffers of its own
        for h in self.heads:
            h._index_slots(fn)
        self.ring._index_queries(fn)
        self._share_ring()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back to an earlier length")
