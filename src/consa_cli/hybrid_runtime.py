"""Self-contained runtime for hybrid full / sliding-window attention, with a KV cache that keeps only what it needs.

This module imports nothing but torch and transformers: ``consa export`` copies its text into KV-head checkpoints
as ``modeling_consa.py``, so they load in plain transformers (remote code) without consa, and consa runs the very
same code.

Layout: in every layer the full-attention (FA) KV heads come first, the sliding-window (SWA) heads after them
(``consa export`` permutes the weights into that order). Each layer is then two dense kernel calls on contiguous
head slices: causal attention for the FA heads, a blocked sliding-window kernel for the SWA heads. The cache
(:class:`HybridCacheLayer`) keeps the FA heads' full history and only the SWA heads' window plus sinks.

Window semantics match transformers': a sliding-window query at position q sees key k when
``q - window < k <= q``, plus the first ``sink_tokens`` keys.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

PREFIX_ATTENTION_NAME = "consa_hybrid"
# Keys of one blocked sliding-window call, in elements: bounds the transient copies of long prefills.
_BLOCKED_CALL_ELEMENTS = 1 << 28
# SDPA kernels for decode steps on CUDA: everything but cuDNN. cuDNN attention builds an execution plan on the
# host for every new key length (~1.6 ms per call on an H100 host, measured with bench/profile_decode.py), and
# during decoding the full-attention heads' key length grows by one every step, so that plan is never reused:
# 28 such calls made a Qwen3-0.6B decode step 2x slower than the same step on flash attention.
_DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# --- kernels: one signature, SDPA is the reference -----------------------------------------------------------


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H * groups, T, D]``, each KV head repeated for its query heads."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def sdpa_backend(query, key, value, mask, is_causal, scaling):
    """SDPA; ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention)."""
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    folded = groups > 1 and mask is not None and q_len == 1 and mask.shape[1] == 1
    if folded:
        # One query per head under a mask shared by the heads: a KV head's query heads become that many query
        # rows of one head, so the keys are read once and never repeated (a static cache's decode step masks
        # its whole buffer: repeating it would copy the cache every step).
        query, groups = query.reshape(batch, key.shape[1], groups, dim), 1
    elif groups > 1 and mask is not None:  # masked kernels fall back to the slow path with enable_gqa
        key, value, groups = repeat_kv(key, groups), repeat_kv(value, groups), 1
    # (Not while compiling: a compiled step has static shapes, so cuDNN's plan cache holds, and the compiler
    # picks the kernel itself.)
    eager_decode = q_len == 1 and query.is_cuda and not torch.compiler.is_compiling()
    with sdpa_kernel(_DECODE_SDPA_BACKENDS) if eager_decode else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling,
                                             enable_gqa=groups > 1)
    return out.reshape(batch, heads, 1, dim) if folded else out


def eager_backend(query, key, value, mask, is_causal, scaling):
    """Plain matmul-softmax-matmul; the readable reference."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal:
        mask = causal_window_mask(query.shape[-2], key.shape[-2], None, 0, query.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


ATTENTION_BACKENDS = {"sdpa": sdpa_backend, "eager": eager_backend}



def causal_window_mask(q_len: int, kv_len: int, window: int | None, sink_tokens: int,
                       device: torch.device | str) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` mask (True = attend) for queries at the last ``q_len`` of ``kv_len`` positions.

    ``window=None`` gives plain causal attention.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    return window_mask(q_pos, k_pos, window, sink_tokens)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, sink_tokens: int) -> torch.Tensor:
    """Who sees whom, from absolute positions (broadcasting ``q_pos`` against ``k_pos``)."""
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((k_pos > q_pos - window) | (k_pos < sink_tokens))
    return allowed


def attend(query, key, value, attention_mask, scaling, backend, window, sink_tokens):
    """Full attention (``window=None``) or sliding-window attention; ``key`` may have fewer heads (GQA)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if window is None or window >= kv_len:
        if attention_mask is None:
            if q_len == kv_len:
                return backend(query, key, value, None, q_len > 1, scaling)
            if q_len == 1:
                return backend(query, key, value, None, False, scaling)
            attention_mask = causal_window_mask(q_len, kv_len, None, 0, query.device)
        return backend(query, key, value, attention_mask, False, scaling)
    if attention_mask is None and q_len == kv_len and q_len >= 4 * window:
        return sliding_blocked(query, key, value, scaling, backend, window, sink_tokens)
    mask = causal_window_mask(q_len, kv_len, window, sink_tokens, query.device)
    if attention_mask is not None:
        mask = mask & attention_mask
    return backend(query, key, value, mask, False, scaling)


def sliding_blocked(query, key, value, scaling, backend, window, sink_tokens):
    """Sliding-window (+ sinks) attention of a whole sequence, over query blocks of ``window`` tokens.

    The first two blocks (which see the sequence start) take one small masked call. Every later block sees the
    sinks, the previous and its own block, always in the same relative pattern, so one ``window x (sinks + 2 *
    window)`` mask serves them all: about ``T / (2 * window)`` times less work than a ``T x T`` masked call,
    and no mask bigger than one tile. Exactly the same result as the masked path.

    Grouped-query attention is folded into the query blocks (a KV head's ``groups`` query heads become one block
    of ``groups * window`` queries) instead of repeating the keys: masked kernels want as many key heads as query
    heads, and the keys are the tensors this layout copies (each key lands in two blocks).
    """
    batch, heads, length, dim = query.shape
    device = query.device
    head = min(length, 2 * window)
    if length == head:
        return backend(query, key, value, causal_window_mask(head, head, window, sink_tokens, device), False,
                       scaling)
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    blocks = -(-(length - head) // window)  # query blocks after the first two
    padding = head + blocks * window - length
    out = query.new_empty(batch, heads, length + padding, dim)
    out[:, :, :head] = backend(query[:, :, :head], key[:, :, :head], value[:, :, :head],
                               causal_window_mask(head, head, window, sink_tokens, device), False, scaling)
    if padding:
        query = F.pad(query, (0, 0, 0, padding))
        key, value = F.pad(key, (0, 0, 0, padding)), F.pad(value, (0, 0, 0, padding))
    # Sink slots padded to a multiple of 8 keep the mask's last dimension aligned for the fused kernels.
    sink_slots = -(-sink_tokens // 8) * 8
    offset = torch.arange(window, device=device).view(-1, 1)
    key_offset = torch.arange(2 * window, device=device).view(1, -1)
    mask = torch.cat([torch.arange(sink_slots, device=device).view(1, -1).expand(window, -1) < sink_tokens,
                      (key_offset > offset) & (key_offset <= offset + window)], dim=1)
    mask = mask.repeat(groups, 1).view(1, 1, groups * window, -1)  # query rows ordered (group, offset)
    per_block = batch * kv_heads * (sink_slots + 2 * window) * dim
    chunk = max(1, _BLOCKED_CALL_ELEMENTS // per_block)
    for first in range(0, blocks, chunk):
        count = min(chunk, blocks - first)
        q_start = head + first * window  # keys of block i: the window before it and its own block

        def key_blocks(states, q_start=q_start, count=count):
            windows = states[:, :, q_start - window : q_start + count * window].unfold(2, 2 * window, window)
            windows = windows.transpose(-1, -2)  # [B, H_kv, count, 2W, D]
            if sink_slots:
                sinks = F.pad(states[:, :, :sink_tokens], (0, 0, 0, sink_slots - sink_tokens))
                windows = torch.cat([sinks.unsqueeze(2).expand(-1, -1, count, -1, -1), windows], dim=3)
            return windows.reshape(batch, kv_heads * count, -1, dim)

        span = query[:, :, q_start : q_start + count * window].view(batch, kv_heads, groups, count, window, dim)
        q_blocks = span.transpose(2, 3).reshape(batch, kv_heads * count, groups * window, dim)
        part = backend(q_blocks, key_blocks(key), key_blocks(value), mask, False, scaling)
        # reshape, not view: some kernels (CUDA memory-efficient SDPA) return another memory layout.
        part = part.reshape(batch, kv_heads, count, groups, window, dim).transpose(2, 3)
        out[:, :, q_start : q_start + count * window].view(batch, kv_heads, groups, count, window, dim).copy_(part)
    return out[:, :, :length]


# --- the cache: full history for FA heads, window + sinks for SWA heads -----------------------------------


@dataclass
class HybridKV:
    """Keys (or values) of one layer as the cache returns them, split by attention type.

    ``full``: ``[B, full_heads, length, D]`` or None; ``sliding``: ``[B, sliding_heads, n, D]`` or None, holding
    positions ``[0, sink_count) + [recent_start, length)``; ``sliding_span`` is None when they are simply
    ``0 .. length - 1`` (a prefill into an empty cache). ``ring_start``: the recent positions sit in a ring
    after the sinks, the oldest at ring slot ``ring_start`` (0: in position order).
    """

    full: torch.Tensor | None
    sliding: torch.Tensor | None
    sliding_span: tuple[int, int] | None
    length: int
    ring_start: int = 0
    # Static cache, decode step: the position each sliding slot holds (-1: empty), a device tensor, so the
    # step needs no Python integer that changes from step to step. ``sliding_span`` and ``length`` are unused then.
    slot_positions: torch.Tensor | None = None
    # Static cache, decode step: tokens written so far (0-d device tensor); ``full`` then spans the whole buffer,
    # a view of token-major storage (``full.transpose(1, 2)`` is contiguous).
    full_length: torch.Tensor | None = None
    # Static cache, decode step: the cache knows each row's left padding and never keeps a padded position in its
    # sliding slots, so each row's filled slots are one run (flash's variable-length form can read them).
    padding_known: bool = False
    # Static cache, several new tokens on a filled cache: the position of each sliding key per row ``[B, n]``
    # (-1: an empty slot), in no particular order.
    row_positions: torch.Tensor | None = None

    def sliding_positions(self, device) -> torch.Tensor:
        """Positions of the sliding keys: ``[n]``, or ``[B, n]`` with -1 for empty slots (``row_positions``)."""
        if self.row_positions is not None:
            return self.row_positions
        if self.sliding_span is None:
            return torch.arange(self.length, device=device)
        sinks, recent = self.sliding_span
        ring = torch.arange(self.length - recent, device=device)
        if self.ring_start:
            ring = (ring - self.ring_start) % ring.numel()
        return torch.cat([torch.arange(sinks, device=device), ring + recent])


class HybridCacheLayer(DynamicLayer):
    """One layer's KV cache: the first ``full_heads`` KV heads keep every token, the others only the
    ``sink_tokens`` first and the ``sliding_window`` latest (what the latest query saw).

    Both live in buffers written in place, so a decode step copies one token, and attends to a view: no
    per-step concatenation, mask or index tensor. Full-attention keys grow by 1/32 of their length (at most
    ``growth_tokens``), so they never hold 4% more than needed. Sliding heads keep ``sink_tokens + window``
    slots: the sinks, then a ring where position ``p`` sits in slot ``(p - sink_tokens) % window``; a single
    new query sees every slot, so their order does not matter.
    """

    is_sliding = False  # masks are built for the full length; the attention function windows the SWA heads
    is_croppable = False
    growth_tokens = 128

    def __init__(self, full_heads: int, sliding_window: int, sink_tokens: int):
        super().__init__()
        self.full_heads, self.sliding_window, self.sink_tokens = full_heads, sliding_window, sink_tokens
        self.length = 0
        self.full_keys = self.full_values = None  # buffers [B, full_heads, capacity, D]
        self.sliding_keys = self.sliding_values = None  # [B, sliding_heads, sink_tokens + window, D]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, heads = self.length, self.full_heads
        self.length += key_states.shape[-2]
        full_keys, full_values = self._append_full(key_states[:, :heads], value_states[:, :heads], start)
        if key_states.shape[1] == heads:
            return HybridKV(full_keys, None, None, self.length), HybridKV(full_values, None, None, self.length)
        sliding_keys, sliding_values, span, ring_start = self._append_sliding(
            key_states[:, heads:], value_states[:, heads:], start)
        return (HybridKV(full_keys, sliding_keys, span, self.length, ring_start),
                HybridKV(full_values, sliding_values, span, self.length, ring_start))

    def _append_full(self, keys, values, start):
        if keys.shape[1] == 0:
            return None, None
        if self.full_keys is None or self.full_keys.shape[2] < self.length:
            capacity = self.length + max(1, min(self.growth_tokens, self.length // 32))
            grown = []
            for old, new in ((self.full_keys, keys), (self.full_values, values)):
                buffer = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
                if old is not None:
                    buffer[:, :, :start] = old[:, :, :start]
                grown.append(buffer)
            self.full_keys, self.full_values = grown
        self.full_keys[:, :, start : self.length] = keys
        self.full_values[:, :, start : self.length] = values
        return self.full_keys[:, :, : self.length], self.full_values[:, :, : self.length]

    def _append_sliding(self, keys, values, start):
        sinks, window = self.sink_tokens, self.sliding_window
        if self.sliding_keys is None:  # prefill into an empty cache: attend over the whole prompt
            shape = (keys.shape[0], keys.shape[1], sinks + window, keys.shape[3])
            self.sliding_keys, self.sliding_values = keys.new_empty(shape), values.new_empty(shape)
            self._store(keys, values, start)
            return keys, values, None, 0
        if keys.shape[2] == 1:  # decode: write one slot, attend to every filled slot
            self._store(keys, values, start)
            filled = min(self.length, sinks + window)
            sink_count = min(sinks, self.length)
            ring_start = (self.length - sinks) % window if self.length > sinks + window else 0
            return (self.sliding_keys[:, :, :filled], self.sliding_values[:, :, :filled],
                    (sink_count, max(sink_count, self.length - window)), ring_start)
        # Several new tokens on a filled cache: the kept keys in position order, then the new ones.
        sink_count = min(sinks, start)
        span = (sink_count, max(sink_count, start - window))
        kept = []
        for buffer, new in ((self.sliding_keys, keys), (self.sliding_values, values)):
            ring = buffer[:, :, sinks : min(start, sinks + window)]
            oldest = (start - sinks) % window if start > sinks + window else 0
            kept.append(torch.cat([buffer[:, :, :sink_count], ring[:, :, oldest:], ring[:, :, :oldest], new], dim=2))
        self._store(keys, values, start)
        return kept[0], kept[1], span, 0

    def _store(self, keys, values, start):
        """Write the positions ``[start, length)`` that later queries can see into the sink and ring slots."""
        sinks, window, end = self.sink_tokens, self.sliding_window, self.length
        pieces = []
        if start < sinks:  # sink slots are positions themselves
            pieces.append((start, min(sinks, end), start))
        first = max(sinks, start, end - window)  # the ring keeps the latest `window` positions past the sinks
        if first < end:
            slot = (first - sinks) % window
            wrap = min(end, first + window - slot)  # positions up to here fit before the ring's end
            pieces.append((first, wrap, sinks + slot))
            if wrap < end:
                pieces.append((wrap, end, sinks))
        for position, stop, slot in pieces:
            self.sliding_keys[:, :, slot : slot + stop - position] = keys[:, :, position - start : stop - start]
            self.sliding_values[:, :, slot : slot + stop - position] = values[:, :, position - start : stop - start]

    def tensors(self) -> list[torch.Tensor]:
        """The cache's storage (for measuring its size)."""
        return [t for t in (self.full_keys, self.full_values, self.sliding_keys, self.sliding_values) if t is not None]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.full_heads, self.sliding_window, self.sink_tokens)

    def _map_batch(self, operation) -> None:
        for name in ("full_keys", "full_values", "sliding_keys", "sliding_values"):
            if getattr(self, name) is not None:
                setattr(self, name, operation(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the hybrid cache drops old sliding-window tokens and cannot be cropped")


class StaticHybridCacheLayer(HybridCacheLayer):
    """:class:`HybridCacheLayer` with fixed-capacity buffers and its length as a device tensor: a decode step
    writes one token at a tensor index and attends to fixed-shape buffers, with no Python state that changes
    between steps. That is what ``torch.compile(mode="reduce-overhead")`` needs to replay a decode step as one CUDA
    graph (``generate(cache_implementation="static")`` compiles it on CUDA), the same contract as transformers'
    ``StaticLayer``.

    Full-attention heads hold ``max_cache_len`` tokens; sliding heads the same ``sink_tokens + window`` slots as
    the dynamic layer, plus the position in each slot. Both are stored token-major (``[B, T, H, D]``, the
    ``[B, H, T, D]`` views for everything else), the layout flash attention's variable-length form reads: a
    decode step reads only each row's written keys (:func:`static_full_decode`, :func:`static_sliding_decode`;
    masked SDPA elsewhere). Prompts (several tokens) run eagerly and read the length on the host once per layer.
    """

    is_compileable = True

    def __init__(self, full_heads: int, sliding_window: int, sink_tokens: int, max_cache_len: int,
                 left_padding: int | list[int] | None = None):
        super().__init__(full_heads, sliding_window, sink_tokens)
        self.max_cache_len = max_cache_len
        # Each row's left padding when whoever made the cache knows it (generate() reads it off its attention mask;
        # an int: the same for every row, 0 for measurements without padding). Then the sliding slots never keep
        # a padded position, each row's ring starts at its first real position past the sinks, and a row's filled
        # slots are one run: decode reads them through flash (:func:`static_sliding_decode`). None: padded
        # positions are kept like any other and masked.
        self.left_padding = left_padding
        self.full_key_tokens = self.full_value_tokens = None  # [B, max_cache_len, full_heads, D]
        self.sliding_key_tokens = self.sliding_value_tokens = None  # [B, sink_tokens + window, sliding_heads, D]
        self.position = None  # 0-d int64 device tensor: tokens cached so far
        # The host's copy of ``position`` while it knows it without reading the device: 0 after initialisation or
        # a reset, a prompt's end after writing it; None once a decode step (compiled: in a CUDA graph only the
        # device counter moves) has run. A host read per layer makes the GPU wait for the host before every next
        # layer's launches: the static prefill ran ~20 ms behind the dynamic one at 32K batch 1 and not at batch 8
        # (H200, session 8), a fixed cost per forward like this one (to be confirmed on the GPU).
        self.host_position: int | None = 0
        self.slot_positions = None  # [B, sink_tokens + window] int64: position held by each sliding slot, -1 if none
        self.ring_origin = None  # [B] int64: the position each row keeps in its first ring slot
        self.rows = None  # [B]: arange, the row index of a per-row write

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        if self.full_heads:
            # Token-major storage ([B, T, H, D]; ``full_keys`` is its [B, H, T, D] view): a decode step hands it to
            # flash attention's variable-length form as it is (:func:`static_full_decode`).
            shape = (batch, self.max_cache_len, self.full_heads, dim)
            self.full_key_tokens, self.full_value_tokens = key_states.new_zeros(shape), value_states.new_zeros(shape)
            self.full_keys, self.full_values = self.full_key_tokens.transpose(1, 2), self.full_value_tokens.transpose(1, 2)
        if heads > self.full_heads:
            shape = (batch, self.sink_tokens + self.sliding_window, heads - self.full_heads, dim)
            self.sliding_key_tokens = key_states.new_zeros(shape)
            self.sliding_value_tokens = value_states.new_zeros(shape)
            self.sliding_keys = self.sliding_key_tokens.transpose(1, 2)
            self.sliding_values = self.sliding_value_tokens.transpose(1, 2)
        slots = self.sink_tokens + self.sliding_window
        device = key_states.device
        padding = self.left_padding if self.left_padding is not None else 0
        self.pads = [padding] * batch if isinstance(padding, int) else [int(p) for p in padding]
        if len(self.pads) != batch:
            raise ValueError(f"left_padding has {len(self.pads)} rows, the batch {batch}")
        self.origins = [max(pad, self.sink_tokens) for pad in self.pads]  # host copies, for eager prompt writes
        self.ring_origin = torch.tensor(self.origins, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)
        self.slot_positions = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.host_position = 0
        # CUDA graphs replay fixed addresses: tell the compiler these buffers are mutated in place, not inputs
        # that change (transformers' StaticLayer does the same; not allowed while tracing).
        if not torch.compiler.is_compiling():
            for tensor in (*self._storage(), self.slot_positions, self.position, self.ring_origin, self.rows):
                torch._dynamo.mark_static_address(tensor)

    def _storage(self) -> list[torch.Tensor]:
        """The buffers themselves (token-major storage, not its views)."""
        return [t for t in (self.full_key_tokens, self.full_value_tokens, self.sliding_key_tokens,
                            self.sliding_value_tokens) if t is not None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] == 1:  # (a compiled step: it reads no host state that changes between steps)
            return self._decode(key_states, value_states)
        if self.host_position == 0 and key_states.shape[0] != self.rows.shape[0]:
            # a reused, empty cache given another batch size: new buffers rather than a shape error
            self.lazy_initialization(key_states, value_states)
        return self._extend(key_states, value_states)

    def _decode(self, keys, values):
        index = self.position.view(1).clone()  # not a view of the counter bumped below (autograd saves it)
        heads = self.full_heads
        full_keys = full_values = sliding_keys = sliding_values = None
        if heads:  # written into the token-major storage itself, not through a view
            self.full_key_tokens.index_copy_(1, index, keys[:, :heads].transpose(1, 2))
            self.full_value_tokens.index_copy_(1, index, values[:, :heads].transpose(1, 2))
            full_keys, full_values = self.full_key_tokens.transpose(1, 2), self.full_value_tokens.transpose(1, 2)
        if keys.shape[1] > heads:
            positions = index.expand(self.rows.shape[0])
            slot = self._slot(positions)  # [B]: each row's ring has its own origin
            self.sliding_key_tokens[self.rows, slot] = keys[:, heads:, 0]
            self.sliding_value_tokens[self.rows, slot] = values[:, heads:, 0]
            self.slot_positions[self.rows, slot] = positions
            sliding_keys = self.sliding_key_tokens.transpose(1, 2)
            sliding_values = self.sliding_value_tokens.transpose(1, 2)
        self.position.add_(1)
        self.host_position = None
        known = self.left_padding is not None
        return (HybridKV(full_keys, sliding_keys, (0, 0), -1, slot_positions=self.slot_positions,
                         full_length=self.position, padding_known=known),
                HybridKV(full_values, sliding_values, (0, 0), -1, slot_positions=self.slot_positions,
                         full_length=self.position, padding_known=known))

    def _extend(self, keys, values):
        # A prompt is eager: one host read per layer, unless the host still knows the position.
        start = self.host_position if self.host_position is not None else int(self.position)
        end = start + keys.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"the static hybrid cache holds {self.max_cache_len} tokens; this input needs {end}")
        heads = self.full_heads
        self.length = end
        full_keys = full_values = None
        if heads:
            self.full_keys[:, :, start:end] = keys[:, :heads]
            self.full_values[:, :, start:end] = values[:, :heads]
            full_keys, full_values = self.full_keys[:, :, :end], self.full_values[:, :, :end]
        self.position.fill_(end)
        self.host_position = end
        if keys.shape[1] == heads:
            return HybridKV(full_keys, None, None, end), HybridKV(full_values, None, None, end)
        new_keys, new_values = keys[:, heads:], values[:, heads:]
        if start == 0:  # into an empty cache: the prompt attends over itself, windowed in the attention
            kept = (HybridKV(full_keys, new_keys, None, end), HybridKV(full_values, new_values, None, end))
        else:  # every slot as it is (a copy), then the new keys; the attention masks each by its position per row
            new_positions = torch.arange(start, end, device=keys.device).expand(keys.shape[0], -1)
            positions = torch.cat([self.slot_positions, new_positions], dim=1)
            kept = tuple(HybridKV(full, torch.cat([held, new], dim=2), (0, 0), end, row_positions=positions)
                         for full, held, new in ((full_keys, self.sliding_keys, new_keys),
                                                 (full_values, self.sliding_values, new_values)))
        self._store_rows(new_keys, new_values, start, end)
        return kept

    def _slot(self, positions: torch.Tensor) -> torch.Tensor:
        """Sliding slot of each row's position (``positions [B]``): sinks are positions themselves, the ring starts
        at the row's origin."""
        sinks = self.sink_tokens
        return torch.where(positions < sinks, positions, sinks + (positions - self.ring_origin) % self.sliding_window)

    def _store_rows(self, keys, values, start: int, end: int) -> None:
        """Write positions ``[start, end)`` that later queries can see into each row's sink and ring slots (eager:
        rows with the same ring origin in one go); padded positions are kept out of the ring and marked empty in
        the sink slots."""
        sinks, window = self.sink_tokens, self.sliding_window
        for origin in sorted(set(self.origins)):
            rows = [row for row, row_origin in enumerate(self.origins) if row_origin == origin]
            index = slice(None) if len(rows) == len(self.origins) else torch.tensor(rows, device=keys.device)
            pieces = [(start, min(sinks, end), start)] if start < sinks else []
            first = max(origin, start, end - window)  # the ring keeps the latest `window` real positions
            if first < end:
                slot = (first - origin) % window
                wrap = min(end, first + window - slot)
                pieces.append((first, wrap, sinks + slot))
                if wrap < end:
                    pieces.append((wrap, end, sinks))
            for position, stop, slot in pieces:
                span = slice(position - start, stop - start)
                self.sliding_key_tokens[index, slot : slot + stop - position] = keys[index, :, span].transpose(1, 2)
                self.sliding_value_tokens[index, slot : slot + stop - position] = values[index, :, span].transpose(1, 2)
                self.slot_positions[index, slot : slot + stop - position] = torch.arange(position, stop,
                                                                                        device=keys.device)
        if start < sinks and self.left_padding is not None:  # a padded sink position is no key to attend to
            for row, pad in enumerate(self.pads):
                if pad > start:
                    self.slot_positions[row, start : min(pad, sinks, end)] = -1

    def get_seq_length(self):
        return self.position if self.is_initialized else 0

    def set_left_padding(self, left_padding: int | list[int] | None) -> None:
        """Each row's left padding for the next prompt into this (empty, reset) cache, e.g. the next ``generate()``
        call reusing it: the rings' origins move in place, so compiled decode graphs keep their addresses."""
        if (left_padding is None) != (self.left_padding is None):
            raise ValueError("a cache reused with left padding known must stay so (the decode path depends on it)")
        self.left_padding = left_padding
        if self.is_initialized:
            padding = left_padding if left_padding is not None else 0
            batch = self.rows.shape[0]
            pads = [padding] * batch if isinstance(padding, int) else [int(p) for p in padding]
            if len(pads) != batch:
                raise ValueError(f"left_padding has {len(pads)} rows, the cache {batch}")
            self.pads, self.origins = pads, [max(pad, self.sink_tokens) for pad in pads]
            self.ring_origin.copy_(torch.tensor(self.origins, dtype=torch.long))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:  # decode: the whole buffer, a fixed shape
            return self.max_cache_len, 0
        if not self.is_initialized:
            return query_length, 0
        start = self.host_position if self.host_position is not None else int(self.position)
        return start + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def _map_batch(self, operation) -> None:  # the [B, H, S, D] buffers stay views of token-major storage
        for kind in ("full", "sliding"):
            storage = [getattr(self, f"{kind}_{part}_tokens") for part in ("key", "value")]
            if storage[0] is not None:
                storage = [operation(tensor) for tensor in storage]
                setattr(self, f"{kind}_key_tokens", storage[0])
                setattr(self, f"{kind}_value_tokens", storage[1])
                setattr(self, f"{kind}_keys", storage[0].transpose(1, 2))
                setattr(self, f"{kind}_values", storage[1].transpose(1, 2))
        if self.slot_positions is not None:  # per-row bookkeeping follows its rows (beam search reorders them)
            self.slot_positions, self.ring_origin = operation(self.slot_positions), operation(self.ring_origin)
            self.pads = operation(torch.tensor(self.pads, device=self.ring_origin.device)).tolist()
            self.origins = self.ring_origin.tolist()
            self.rows = torch.arange(self.ring_origin.shape[0], device=self.ring_origin.device)

    def reset(self) -> None:
        if self.is_initialized:  # in place: compiled graphs keep these addresses
            for tensor in self._storage():
                tensor.zero_()
            self.slot_positions.fill_(-1)
            self.position.zero_()
            self.host_position = 0


def _flash_decodable(query, key, value) -> bool:
    """Whether flash attention's variable-length form can take this decode step as it is: CUDA, half precision,
    a supported head size, keys and values ``[B, H, S, D]`` views of token-major storage."""
    dim = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dim <= 256 and dim % 8 == 0
            and key.transpose(1, 2).is_contiguous() and value.transpose(1, 2).is_contiguous())


def _flash_varlen_decode(query, key, value, start, used, scaling):
    """One query token per row against token-major buffers, row ``b`` using slots ``[start[b], start[b] + used[b])``:
    flash attention's variable-length form, which splits the keys over the GPU and reads no other slot."""
    batch, heads, _, dim = query.shape
    slots = key.shape[2]
    row_starts = torch.arange(batch + 1, device=query.device, dtype=torch.int32)
    key_starts = row_starts * slots
    key_starts[:batch] += start.to(torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        query.reshape(batch, heads, dim), key.transpose(1, 2).flatten(0, 1), value.transpose(1, 2).flatten(0, 1),
        row_starts, key_starts, 1, slots, 0.0, False, False, scale=scaling, seqused_k=used.to(torch.int32))[0]
    return out.view(batch, heads, 1, dim)


def _is_one_run_per_row(rows: torch.Tensor, used: torch.Tensor) -> bool:
    """Eager check that each row's visible slots (``rows [B, S]``) number what the flash call will read (a
    compiled step trusts it: the caches only build such masks)."""
    return torch.compiler.is_compiling() or torch.equal(rows.sum(dim=-1), used.expand(rows.shape[0]))


def static_full_decode(query, key, value, mask, length, scaling, backend):
    """One query token per sequence against a static cache's full-head buffer (``[B, H, S, D]`` views of
    token-major storage), of which each row uses ``[start, length)``: ``start`` its left padding, read from
    ``mask`` (``[B or 1, 1, 1, S]``, True = attend), ``length`` the tokens written (0-d device tensor).

    On CUDA in half precision this is flash attention's variable-length form (:func:`_flash_varlen_decode`). A
    masked SDPA call over the buffer is 5x (batch 8) to 25x (batch 1) slower at 32K keys on an H200, because its
    kernels give one sequence's query heads to one thread block (bench/profile_decode.py --static-attention).
    Elsewhere, and for a mask that is not one run of visible keys per row (generate() builds none), masked SDPA.
    """
    slots = key.shape[2]
    if mask is None:
        mask = (torch.arange(slots, device=query.device) < length).view(1, 1, 1, slots)
    if not _flash_decodable(query, key, value):
        return backend(query, key, value, mask, False, scaling)
    rows = mask.reshape(mask.shape[0], slots).expand(query.shape[0], slots)
    start = rows.int().argmax(dim=-1)  # the first visible key
    used = length - start
    if not _is_one_run_per_row(rows, used):
        return backend(query, key, value, mask, False, scaling)
    return _flash_varlen_decode(query, key, value, start, used, scaling)


def static_sliding_decode(query, key, value, slot_positions, attention_mask, padding_known, scaling, backend):
    """One query token per sequence against a static cache's sliding slots (sinks, then the ring; ``[B, H, S,
    D]`` views of token-major storage); ``slot_positions [B, S]`` holds each slot's position (-1: empty).

    Every filled slot is in the new query's window. When the cache knows each row's left padding
    (``padding_known``) it keeps no padded position, and each row's filled slots are one run (the real sink
    positions, then its ring from slot 0): flash's variable-length form reads them, as for the full heads. Else
    the padded positions sit among the others and the slots are masked (masked SDPA)."""
    batch, slots = query.shape[0], key.shape[2]
    filled = slot_positions >= 0
    visible = filled
    if attention_mask is not None:
        rows = attention_mask.reshape(attention_mask.shape[0], -1).expand(batch, -1)
        visible = filled & torch.gather(rows, 1, slot_positions.clamp(min=0))
    mask = visible.view(batch, 1, 1, slots)
    if not (padding_known and _flash_decodable(query, key, value)):
        return backend(query, key, value, mask, False, scaling)
    start, used = filled.int().argmax(dim=-1), filled.sum(dim=-1)
    if not _is_one_run_per_row(visible, used):
        return backend(query, key, value, mask, False, scaling)
    return _flash_varlen_decode(query, key, value, start, used, scaling)


# --- attention over contiguous head slices -------------------------------------------------------------------


@dataclass
class PrefixHybrid:
    """Per-layer settings, stored on the attention module as ``module.consa_prefix``: the first ``full_heads``
    KV heads use full attention, the rest a sliding window."""

    full_heads: int
    sliding_window: int
    sink_tokens: int
    backend: str = "sdpa"


def split_head_attention(query, key, value, attention_mask, scaling, full_heads, window, sink_tokens, backend):
    """Attention of one layer whose first ``full_heads`` KV heads are full, the rest sliding-window.

    ``key``/``value`` are tensors ``[B, H_kv, kv_len, D]`` (no cache, or a plain DynamicCache) or
    :class:`HybridKV` from a :class:`HybridCacheLayer`. Returns ``[B, H_q, q_len, D]``.
    """
    if isinstance(key, torch.Tensor):  # not HybridKV (duck-typed: an export's copy of this module has its own)
        key, value = _split_heads(key, full_heads), _split_heads(value, full_heads)
    num_kv_heads = sum(t.shape[1] for t in (key.full, key.sliding) if t is not None)
    groups = query.shape[1] // num_kv_heads
    split_at = full_heads * groups
    parts = []
    if key.full is not None and key.full_length is not None:  # static cache, one new query
        parts.append(static_full_decode(query[:, :split_at], key.full, value.full, attention_mask, key.full_length,
                                        scaling, backend))
    elif key.full is not None:
        parts.append(attend(query[:, :split_at], key.full, value.full, attention_mask, scaling, backend, None, 0))
    if key.sliding is not None:
        sliding_query = query[:, split_at:]
        if key.sliding_span is None:
            parts.append(attend(sliding_query, key.sliding, value.sliding, attention_mask, scaling, backend, window,
                                sink_tokens))
        elif key.slot_positions is not None:  # static cache, one new query: every filled slot is in its window
            parts.append(static_sliding_decode(sliding_query, key.sliding, value.sliding, key.slot_positions,
                                               attention_mask, key.padding_known, scaling, backend))
        else:  # the cache kept only sinks + recent keys: a single new query sees them all, else mask by position
            parts.append(backend(sliding_query, key.sliding, value.sliding,
                                 _kept_keys_mask(key, query.shape[2], attention_mask, window, sink_tokens), False,
                                 scaling))
    if len(parts) == 1:
        return parts[0]
    if query.shape[2] == 1:  # decode: one concatenation is one launch, and its transpose is already contiguous
        return torch.cat(parts, dim=1)
    # Prefill: both parts written into one buffer in the layout the caller returns ([B, T, H, D]), so its
    # transpose back is free: one copy of the output instead of a concatenation and a transpose.
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3]).transpose(1, 2)
    out[:, :split_at] = parts[0]
    out[:, split_at:] = parts[1]
    return out


def _kept_keys_mask(key, q_len: int, attention_mask, window: int, sink_tokens: int) -> torch.Tensor | None:
    """Mask for ``q_len`` new queries over the sliding keys a cache kept (sinks + recent, or a static cache's
    slots per row with -1 for empty ones): window by position, and padding; None when a single query sees all."""
    per_row = key.row_positions is not None
    if q_len == 1 and attention_mask is None and not per_row:
        return None
    k_pos = key.sliding_positions(key.sliding.device)
    batch = key.sliding.shape[0]
    seen = k_pos.clamp(min=0).view(batch, 1, 1, -1) if per_row else k_pos
    mask = (k_pos >= 0).view(batch, 1, 1, -1) if per_row else None
    if q_len > 1:
        q_pos = torch.arange(key.length - q_len, key.length, device=k_pos.device).unsqueeze(1)
        in_window = window_mask(q_pos, seen if per_row else seen.unsqueeze(0), window, sink_tokens)
        mask = in_window if mask is None else mask & in_window
    if attention_mask is not None:
        if per_row:
            rows = attention_mask.expand(batch, -1, -1, -1)
            padding = torch.gather(rows, 3, seen.expand(batch, 1, rows.shape[2], seen.shape[-1]))
        else:
            padding = attention_mask[..., seen]
        mask = padding if mask is None else mask & padding
    return mask


def _split_heads(states: torch.Tensor, full_heads: int) -> HybridKV:
    full, sliding = states[:, :full_heads], states[:, full_heads:]
    return HybridKV(full if full.shape[1] else None, sliding if sliding.shape[1] else None, None, states.shape[2])


def prefix_hybrid_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function for layers carrying :class:`PrefixHybrid` settings."""
    if kwargs.get("softcap") is not None:
        raise ValueError("consa attention does not support attention logit softcapping")
    settings = module.consa_prefix
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask -> bool
    out = split_head_attention(query, key, value, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling,
                           settings.full_heads, settings.sliding_window, settings.sink_tokens,
                           ATTENTION_BACKENDS[settings.backend])
    return out.transpose(1, 2).contiguous(), None


def causal_padding_mask(*args, **kwargs):
    """Mask function for consa's attention: causal + padding only; windows are applied inside the attention
    function, so even layers a model natively builds a sliding mask for (Gemma3) get the plain causal mask.
    transformers skips it (None) for the plain causal square, except while a CUDA graph is captured or dynamo
    traces: inputs that are never padded use an attention name without a mask function instead
    (``consa_cli.attention.UNPADDED_ATTENTION_NAME``, the search's)."""
    kwargs["mask_function"] = causal_mask_function
    kwargs.pop("local_size", None)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION_NAME, prefix_hybrid_forward)
AttentionMaskInterface.register(PREFIX_ATTENTION_NAME, causal_padding_mask)


# --- putting it on a model ----------------------------------------------------------------------------------------


def decoder_attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in layer order."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(base, "language_model"):
        layers = base.language_model.layers
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return [layer.self_attn for layer in layers]


def hybrid_cache(model, max_cache_len: int | None = None, left_padding: int | list[int] | None = None) -> Cache:
    """A fresh cache for a model carrying :class:`PrefixHybrid` settings (pass it to a forward as
    :func:`cache_argument`); with ``max_cache_len``, the static form (:class:`StaticHybridCacheLayer`) that
    compiled decoding needs. ``left_padding`` (static form only): each row's padding tokens at the start, or one
    int for all rows (0: none), when the caller knows it; the sliding heads then decode through flash."""
    settings = [m.consa_prefix for m in decoder_attention_modules(model)]
    if max_cache_len is None:
        return Cache(layers=[HybridCacheLayer(s.full_heads, s.sliding_window, s.sink_tokens) for s in settings])
    return Cache(layers=[StaticHybridCacheLayer(s.full_heads, s.sliding_window, s.sink_tokens, max_cache_len,
                                                left_padding) for s in settings])


def left_padding_of(attention_mask: torch.Tensor | None) -> int | list[int] | None:
    """Each row's left padding from a ``[B, T]`` 0/1 attention mask (0 without a mask), or None when a row is not
    padded on the left only (then the mask alone says which keys count)."""
    if attention_mask is None:
        return 0
    real = attention_mask.bool()
    pads = (real.int().cumsum(dim=-1) == 0).sum(dim=-1)
    if not torch.equal(real.sum(dim=-1) + pads, torch.full_like(pads, real.shape[-1])):
        return None
    return pads.tolist()


def cache_argument(model) -> str:
    """The name ``forward`` / ``generate`` take the cache under: ``cache`` since transformers 5.2x, else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def reusable_static_cache(model, batch_size: int, max_cache_len: int, left_padding: int | list[int] | None) -> Cache:
    """The static hybrid cache of ``model``'s previous ``generate()`` call, reset and given this call's left
    padding, when it fits this call (batch size, capacity, whether the padding is known, the model's dtype and
    device), else a new one, kept on the model for the next.

    Compiled decoding replays CUDA graphs that read the cache's buffers at fixed addresses: a new cache per call
    makes them re-record every call and, past torch's re-record limit, fall back to running without graphs.
    transformers reuses its own StaticCache across calls for the same reason.
    """
    previous = getattr(model, "_consa_static_cache", None)
    if previous is not None and _fits(previous, model, batch_size, max_cache_len, left_padding):
        previous.reset()
        for layer in previous.layers:
            layer.set_left_padding(left_padding)
        return previous
    cache = hybrid_cache(model, max_cache_len, left_padding)
    model._consa_static_cache = cache
    return cache


def _fits(cache: Cache, model, batch_size: int, max_cache_len: int, left_padding: int | list[int] | None) -> bool:
    layers = cache.layers
    if not layers or not all(isinstance(layer, StaticHybridCacheLayer) for layer in layers):
        return False
    # Another padding is fine (set_left_padding), but whether it is known at all changes the decode path.
    if any(layer.max_cache_len != max_cache_len or (layer.left_padding is None) != (left_padding is None)
           for layer in layers):
        return False
    if isinstance(left_padding, list) and len(left_padding) != batch_size:
        return False
    parameter = next(model.parameters())
    return all(not layer.is_initialized or (storage.shape[0] == batch_size and storage.dtype == parameter.dtype
                                            and storage.device == parameter.device)
               for layer in layers for storage in layer._storage()[:1])


def prepare_hybrid_cache(model, generation_config, model_kwargs, *args, **kwargs):
    """``generate()`` hook: the hybrid cache unless the caller passed a cache; ``cache_implementation="static"``
    gives the static hybrid cache (transformers then compiles decoding on CUDA), any other implementation is
    transformers' own."""
    name = cache_argument(model)
    implementation = generation_config.cache_implementation
    if model_kwargs.get(name) is None and generation_config.use_cache is not False and implementation in (
            None, "dynamic", "static"):
        if implementation == "static":  # _prepare_cache_for_generation(config, kwargs, mode, batch, max_length)
            max_cache_len = kwargs.get("max_cache_length", args[2] if len(args) > 2 else generation_config.max_length)
            left_padding = left_padding_of(model_kwargs.get("attention_mask"))  # one look, before any step
            batch_size = kwargs.get("batch_size", args[1] if len(args) > 1 else 1)
            # The rows the cache will hold: beam search and several returned sequences widen the batch.
            batch_size *= max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            model_kwargs[name] = reusable_static_cache(model, batch_size, max_cache_len, left_padding)
        else:
            model_kwargs[name] = hybrid_cache(model)
        return None
    return type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)


def install_prefix_hybrid(model, full_heads: list[int], sliding_window: int, sink_tokens: int,
                          backend: str = "sdpa") -> None:
    """Run ``model`` (KV heads already ordered FA first) as the hybrid, and make ``generate()`` use the hybrid cache."""
    modules = decoder_attention_modules(model)
    if len(full_heads) != len(modules):
        raise ValueError(f"{len(full_heads)} layers of full-head counts for a model with {len(modules)} layers")
    for module, count in zip(modules, full_heads, strict=True):
        module.consa_prefix = PrefixHybrid(int(count), sliding_window, sink_tokens, backend)
    model._prepare_cache_for_generation = types.MethodType(prepare_hybrid_cache, model)
    model.set_attn_implementation(PREFIX_ATTENTION_NAME)
