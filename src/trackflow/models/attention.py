"""Causal attention, encoder and decoder layers with a per-row key/value cache.

Modelled on torch's stock transformer layers plus the incremental decoding of autoregressive decoders
(a key/value cache per layer, as Hugging Face's ``past_key_values``), kept per tracking slot.

Parameter names follow torch's ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (packed
``in_proj_weight``), so the weights are interchangeable with the stock layers. Attention over whole
sequences runs through ``torch.nn.functional.scaled_dot_product_attention``; decoding one token runs as two
batched products per group of rows of about the same length (:func:`plan_key_groups`), each over its own
width of the caches, so that a step costs what the rows' real lengths cost.

The same layer code serves the whole-sequence forward (training) and incremental decoding (tracking):
with a :class:`KVCache` and a :class:`CacheWrite`, a layer stores the keys/values of the tokens it gets
and attends over everything the cache holds for those rows. Shape letters: B rows, T points,
H heads, D model width, S cache slots, P cache capacity (points).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trackflow.models.rows import aligned_tokens

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # gelu: exact (erf), as torch's layers


def attention_mask(query_positions: torch.Tensor, n_keys: int, lengths: torch.Tensor) -> torch.Tensor:
    """Boolean mask, True where a query may attend a key: causal and within the row's length.

    Parameters
    ----------
    query_positions : LongTensor [B, T] or [1, T]
        Position of each query token.
    n_keys : int
        Number of key positions (0 .. n_keys-1).
    lengths : LongTensor [B]
        Number of real tokens per row; keys at positions >= length are padding.

    Returns
    -------
    BoolTensor [B, 1, T, n_keys] (broadcast over heads).
    """
    key_positions = torch.arange(n_keys, device=lengths.device)
    causal = key_positions <= query_positions[..., None]  # [B, T, n_keys]
    not_padding = key_positions < lengths[:, None, None]
    return (causal & not_padding)[:, None]


# Planning cost units: attending one row over one cache position in place (on views of every slot's cache).
# Gathering a row's keys first and attending over the copy costs about three times as much (measured on
# CPU), and every extra group of rows costs a few small kernel calls per module, about as much as this
# many in-place positions.
GATHER_COST = 3
GROUP_COST = 4096
# A decoding group attends over at least KEY_ELEMENTS / head size positions (at least 16). Below about 400 /
# head size positions MKL's batched products of a decoding step take small-matrix kernels that sum in another
# order (measured on a Sapphire Rapids Xeon, head sizes 2-12: from 200, 100, 67, 50 and <40 positions), so a
# row's result would change with the width of its group, i.e. with the other rows in flight; from there every
# width gives the same bits (tests/test_rows.py checks it on the machine it runs on). Those small kernels are
# no faster per position either (head size 8: 1,000 slots x 4 heads at 48 positions took longer than at 52).
KEY_ELEMENTS = 512


def min_group_keys(head_size: int) -> int:
    """Fewest positions a decoding key group attends over, for heads of ``head_size`` (see KEY_ELEMENTS)."""
    return max(16, -(-KEY_ELEMENTS // head_size))


def plan_key_groups(lengths: np.ndarray, n_slots: int, min_keys: int) -> list[tuple[np.ndarray, int, bool]]:
    """Split the rows of a decoding call so that each attends over about its own length, not the longest's.

    Rows are bucketed by powers of two of their length; neighbouring buckets are merged when a separate
    group would cost more than the extra positions; then the shortest groups become one in-place group
    (attention for every slot on views of the caches, no copy) when that is cheaper than gathering them.

    Parameters
    ----------
    lengths : int array [B], cache positions each row attends over now.
    n_slots : int, slots of the caches (the width of an in-place group).
    min_keys : int, the smallest bucket (``min_group_keys``).

    Returns
    -------
    list of (row indices [n] into the call, longest length among them, in place), shortest first.
    """
    buckets = np.maximum(min_keys, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))).astype(np.int64)
    groups = []  # [row indices, longest]
    for bucket in np.unique(buckets):
        rows = np.flatnonzero(buckets == bucket)
        longest = int(lengths[rows].max())
        if groups and GATHER_COST * len(groups[-1][0]) * (longest - groups[-1][1]) < GROUP_COST:
            groups[-1] = [np.concatenate([groups[-1][0], rows]), longest]
        else:
            groups.append([rows, longest])
    gathered = [GATHER_COST * len(rows) * longest + GROUP_COST for rows, longest in groups]
    # in place up to group k: one pass over every slot at group k's width, the longer groups gathered
    costs = [sum(gathered)] + [n_slots * groups[k][1] + GROUP_COST + sum(gathered[k + 1:])
                               for k in range(len(groups))]
    n_in_place = int(np.argmin(costs))
    plan = [(rows, longest, False) for rows, longest in groups[n_in_place:]]
    if n_in_place:
        rows = np.concatenate([rows for rows, _ in groups[:n_in_place]])
        plan.insert(0, (rows, groups[n_in_place - 1][1], True))
    return plan


@dataclass
class KeyGroup:
    """Cache slots that attend over the same number of cache positions in a decoding call.

    slots : LongTensor [n], the group's slots (in place: unused, the group is every slot).
    n_keys : int, positions attended (at least every member's length).
    in_place : bool. True: attention runs for every slot on views of the caches (no copy); False: the
        members' keys are gathered first.
    key_lengths : LongTensor, real positions of each slot attention runs for: [S] in place, else [n].
    _score_bias : filled by :meth:`score_bias` at the first module and reused by the others.
    """

    slots: torch.Tensor
    n_keys: int
    in_place: bool
    key_lengths: torch.Tensor
    _score_bias: torch.Tensor | None = None

    def score_bias(self, nheads: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive bias [slots * H, 1, n_keys]: 0 at the slots' real positions, -inf elsewhere."""
        if self._score_bias is None:
            key_positions = torch.arange(self.n_keys, device=self.key_lengths.device)
            padding = key_positions >= self.key_lengths[:, None]  # [slots, n_keys]
            bias = torch.zeros(padding.shape, dtype=dtype, device=padding.device).masked_fill_(padding,
                                                                                             float("-inf"))
            self._score_bias = bias[:, None].expand(-1, nheads, -1).reshape(-1, 1, self.n_keys)
        return self._score_bias


@dataclass
class CacheWrite:
    """Where the tokens of one call go in the caches, and which keys they attend over.

    rows : LongTensor [B], the slots being processed (distinct, except a scratch slot whose content
        does not matter: duplicates write to it in no defined order).
    positions : LongTensor [B] or None. None: the call holds a whole prefix (tokens 0..T-1, prefill);
        otherwise the call holds one token per row, written at that row's position (decoding).
    groups : decoding only, :class:`KeyGroup` s covering every row's slot, an in-place group first.
    _flat_index : decoding only, filled by :meth:`flat_index` at the first module and reused by the others.
    """

    rows: torch.Tensor
    positions: torch.Tensor | None = None
    groups: list = field(default_factory=list)
    _flat_index: torch.Tensor | None = None

    def flat_index(self, cache_shape: torch.Size) -> torch.Tensor:
        """Decoding: LongTensor [2 * B * H], row-major over (key/value, row, head), of each new token's place
        in a key/value cache [2, S, H, P, D/H] seen as [2 * S * H * P, D/H]; computed once per call, shared
        by every module (all caches of a model have the same shape)."""
        if self._flat_index is None:
            _, n_slots, nheads, max_points, _ = cache_shape
            device = self.rows.device
            slots = torch.arange(2, device=device)[:, None] * n_slots + self.rows  # [2, B]
            heads = torch.arange(nheads, device=device)
            self._flat_index = ((slots[..., None] * nheads + heads) * max_points
                                + self.positions[:, None]).reshape(-1)
        return self._flat_index


class KVCache:
    """Keys and values of one attention module for every tracking slot, preallocated.

    Each slot (row) holds its own number of positions, so rows resume from ragged prefixes.
    Zero-initialised: a masked position gets attention weight 0, but 0 * NaN is still NaN.
    """

    def __init__(self, n_slots: int, nheads: int, max_points: int, head_size: int,
                 device: torch.device, dtype: torch.dtype):
        # One tensor [2, S, H, P, D/H], so that a decoding step stores its keys and values in one call.
        self.keys_values = torch.zeros((2, n_slots, nheads, max_points, head_size), device=device, dtype=dtype)
        self.keys, self.values = self.keys_values  # views [S, H, P, D/H]

    @property
    def capacity(self) -> int:
        """Positions held per slot."""
        return self.keys_values.shape[3]

    def grow(self, n_positions: int) -> None:
        """Hold ``n_positions`` positions per slot (more than now), keeping every stored one."""
        grown = self.keys_values.new_zeros((*self.keys_values.shape[:3], n_positions, self.keys_values.shape[4]))
        grown[:, :, :, :self.capacity] = self.keys_values
        self.keys_values = grown
        self.keys, self.values = grown

    def store_prefixes(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefill: keys/values [B, H, T, D/H] of tokens 0..T-1 of the rows."""
        n_tokens = keys.shape[2]
        # index_copy_ on a view writes through to the cache; advanced-index assignment is far slower.
        self.keys[:, :, :n_tokens].index_copy_(0, rows, keys)
        self.values[:, :, :n_tokens].index_copy_(0, rows, values)

    def store_tokens(self, write: CacheWrite, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Decoding: keys/values [B, H, 1, D/H], one token per row at its position."""
        # One index_copy_ on the flat [2 * S * H * P, D/H] view: far cheaper than advanced-index assignment.
        head_size = keys.shape[-1]
        self.keys_values.view(-1, head_size).index_copy_(0, write.flat_index(self.keys_values.shape),
                                                         torch.stack([keys, values]).view(-1, head_size))


class MultiheadAttention(nn.Module):
    """Multi-head attention with packed q/k/v projections (torch's ``nn.MultiheadAttention`` names).

    Heads are contiguous slices of the projected vector; scale 1/sqrt(D/H); dropout on the
    attention weights in training.
    """

    def __init__(self, d_model: int, nheads: int, dropout: float):
        super().__init__()
        self.nheads = nheads
        self.head_size = d_model // nheads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        # Same initialisation as torch's MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def new_cache(self, n_slots: int, max_points: int, device, dtype) -> KVCache:
        """Zeroed key/value cache [n_slots, H, max_points, D/H] for this module."""
        return KVCache(n_slots, self.nheads, max_points, self.head_size, device, dtype)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, width = x.shape
        return x.view(batch, n_tokens, self.nheads, width // self.nheads).transpose(1, 2)  # [B, H, T, D/H]

    def _merge_heads(self, out: torch.Tensor, tracking: bool) -> torch.Tensor:
        """Heads [B, H, T, D/H] -> output projection [B, T, D]."""
        batch, _, n_tokens, _ = out.shape
        merged = out.transpose(1, 2).reshape(batch, n_tokens, -1)
        return self.out_proj(aligned_tokens(merged) if tracking else merged)

    def _attend(self, queries, keys, values, mask, cache: KVCache | None, write: CacheWrite | None
                ) -> torch.Tensor:
        """Heads [B, H, T, D/H] -> [B, T, D]; with a cache, the keys/values are stored first.

        Whole sequences and prefills run through scaled_dot_product_attention with the boolean ``mask``
        (True = attend); decoding attends over the cache, group by group (``write.groups``).
        """
        dropout = self.dropout if self.training else 0.0
        if write is not None and write.positions is not None:
            cache.store_tokens(write, keys, values)
            return self._merge_heads(self._attend_cached(queries, cache, write, dropout), True)
        if cache is not None:
            cache.store_prefixes(write.rows, keys, values)
        return self._merge_heads(F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                                dropout_p=dropout), cache is not None)

    def _attend_cached(self, queries, cache: KVCache, write: CacheWrite, dropout: float) -> torch.Tensor:
        """Decoding: queries [B, H, 1, D/H] over each row's cached positions -> [B, H, 1, D/H].

        Attention runs per slot (each row's query goes to its slot; idle slots attend with a zero query and
        are dropped), group by group, each over its own width of the caches: the cost follows the rows'
        lengths, not the longest's. A slot in no group gets NaN (or, after an in-place group, garbage).
        """
        n_slots = cache.keys.shape[0]
        slot_queries = queries.new_zeros(n_slots, *queries.shape[1:])  # [S, H, 1, D/H]
        slot_queries.index_copy_(0, write.rows, queries)
        slot_out = None
        for group in write.groups:
            keys, values = cache.keys[:, :, :group.n_keys], cache.values[:, :, :group.n_keys]
            bias = group.score_bias(self.nheads, queries.dtype)
            if group.in_place:
                slot_out = self._attend_one_token(slot_queries, keys, values, bias, dropout)
                continue
            if slot_out is None:
                slot_out = torch.full_like(slot_queries, float("nan"))
            # index_select, not keys[slots]: advanced indexing of a slice takes a slow strided path.
            slot_out.index_copy_(0, group.slots, self._attend_one_token(
                slot_queries.index_select(0, group.slots), keys.index_select(0, group.slots),
                values.index_select(0, group.slots), bias, dropout))
        return slot_out.index_select(0, write.rows)

    def _attend_one_token(self, queries, keys, values, score_bias, dropout: float) -> torch.Tensor:
        """Queries [R, H, 1, D/H] over keys/values [R, H, n_keys, D/H] -> [R, H, 1, D/H].

        Two batched products on strided views of the caches: reading the keys and values is the whole cost
        of a step, and scaled_dot_product_attention's CPU kernel reads them more slowly (measured).
        """
        batch, nheads, _, head_size = queries.shape
        n_keys = keys.shape[2]
        # Merging R and H is a view for the caches' slices: no copy of the keys or values.
        scores = torch.baddbmm(score_bias, queries.reshape(batch * nheads, 1, head_size),
                               keys.transpose(-1, -2).reshape(batch * nheads, head_size, n_keys),
                               alpha=head_size ** -0.5)  # [R * H, 1, n_keys]
        weights = torch.softmax(scores, dim=-1)
        if dropout:
            weights = F.dropout(weights, dropout)
        return torch.bmm(weights, values.reshape(batch * nheads, n_keys, head_size)).view(queries.shape)

    def self_attention(self, x: torch.Tensor, mask: torch.Tensor | None,
                       cache: KVCache | None = None, write: CacheWrite | None = None) -> torch.Tensor:
        """x [B, T, D], mask [B, 1, T, keys] (None when decoding) -> [B, T, D]; one fused q/k/v projection.

        Tracking (a cache): the products get rows aligned as ``models.rows`` says, so that a row's result
        does not depend on the other rows."""
        if cache is not None:
            x = aligned_tokens(x)
        queries, keys, values = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        queries, keys, values = map(self._split_heads, (queries, keys, values))
        return self._attend(queries, keys, values, mask, cache, write)

    def cross_attention(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None,
                        cache: KVCache | None = None, write: CacheWrite | None = None) -> torch.Tensor:
        """Queries from x [B, T, D], keys/values from memory [B, T, D] -> [B, T, D]."""
        width = x.shape[-1]
        if cache is not None:
            x, memory = aligned_tokens(x), aligned_tokens(memory)
        queries = F.linear(x, self.in_proj_weight[:width], self.in_proj_bias[:width])
        keys, values = F.linear(memory, self.in_proj_weight[width:], self.in_proj_bias[width:]).chunk(2, -1)
        queries, keys, values = map(self._split_heads, (queries, keys, values))
        return self._attend(queries, keys, values, mask, cache, write)


class _TransformerLayer(nn.Module):
    """Parts shared by the encoder and decoder layers: self-attention and the feed-forward block."""

    def __init__(self, d_model: int, nheads: int, ffnn_hidden_size: int, dropout: float,
                 activation: str, norm_first: bool):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.linear1 = nn.Linear(d_model, ffnn_hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffnn_hidden_size, d_model)
        self.activation = ACTIVATIONS[activation]
        self.norm_first = norm_first

    def _feed_forward(self, x: torch.Tensor, tracking: bool) -> torch.Tensor:
        """Tracking: product rows aligned (see ``models.rows``)."""
        align = aligned_tokens if tracking else (lambda t: t)
        return self.linear2(align(self.dropout(self.activation(self.linear1(align(x))))))

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, block) -> torch.Tensor:
        """Post-norm LN(x + block(x)), or pre-norm x + block(LN(x))."""
        if self.norm_first:
            return x + block(norm(x))
        return norm(x + block(x))


class EncoderLayer(_TransformerLayer):
    """Causal self-attention then feed-forward; parameters named as ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_model: int, nheads: int, ffnn_hidden_size: int, dropout: float,
                 activation: str, norm_first: bool):
        super().__init__(d_model, nheads, ffnn_hidden_size, dropout, activation, norm_first)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, write: CacheWrite | None = None) -> torch.Tensor:
        """x [B, T, D], mask [B, 1, T, keys] -> [B, T, D]."""
        x = self._residual(x, self.norm1, lambda h: self.dropout1(
            self.self_attn.self_attention(h, mask, cache, write)))
        return self._residual(x, self.norm2, lambda h: self.dropout2(self._feed_forward(h, cache is not None)))


class DecoderLayer(_TransformerLayer):
    """Causal self-attention, causal cross-attention to the encoder output, feed-forward.

    Parameters named as ``nn.TransformerDecoderLayer`` (``multihead_attn`` is the cross-attention).
    """

    def __init__(self, d_model: int, nheads: int, ffnn_hidden_size: int, dropout: float,
                 activation: str, norm_first: bool):
        super().__init__(d_model, nheads, ffnn_hidden_size, dropout, activation, norm_first)
        self.multihead_attn = MultiheadAttention(d_model, nheads, dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm3 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                caches: tuple[KVCache, KVCache] | None = None, write: CacheWrite | None = None
                ) -> torch.Tensor:
        """x, memory [B, T, D], mask [B, 1, T, keys] -> [B, T, D]; caches = (self, cross)."""
        self_cache, cross_cache = caches if caches is not None else (None, None)
        x = self._residual(x, self.norm1, lambda h: self.dropout1(
            self.self_attn.self_attention(h, mask, self_cache, write)))
        x = self._residual(x, self.norm2, lambda h: self.dropout2(
            self.multihead_attn.cross_attention(h, memory, mask, cross_cache, write)))
        return self._residual(x, self.norm3, lambda h: self.dropout3(self._feed_forward(h, caches is not None)))


class Encoder(nn.Module):
    """Stack of encoder layers (``.layers.<i>``), no final norm."""

    def __init__(self, n_layers: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_args) for _ in range(n_layers))

    def new_caches(self, n_slots: int, max_points: int, device, dtype) -> list[KVCache]:
        return [layer.self_attn.new_cache(n_slots, max_points, device, dtype) for layer in self.layers]

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                caches: list[KVCache] | None = None, write: CacheWrite | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, caches[i] if caches is not None else None, write)
        return x


class Decoder(nn.Module):
    """Stack of decoder layers (``.layers.<i>``), no final norm."""

    def __init__(self, n_layers: int, **layer_args):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**layer_args) for _ in range(n_layers))

    def new_caches(self, n_slots: int, max_points: int, device, dtype) -> list[tuple[KVCache, KVCache]]:
        return [(layer.self_attn.new_cache(n_slots, max_points, device, dtype),
                 layer.multihead_attn.new_cache(n_slots, max_points, device, dtype))
                for layer in self.layers]

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor,
                caches: list[tuple[KVCache, KVCache]] | None = None,
                write: CacheWrite | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, mask, caches[i] if caches is not None else None, write)
        return x


class EncoderDecoder(nn.Module):
    """Encoder and decoder (``.encoder.layers.<i>``, ``.decoder.layers.<i>``), as ``nn.Transformer``."""

    def __init__(self, n_layers_e: int, n_layers_d: int, **layer_args):
        super().__init__()
        self.encoder = Encoder(n_layers_e, **layer_args)
        self.decoder = Decoder(n_layers_d, **layer_args)

