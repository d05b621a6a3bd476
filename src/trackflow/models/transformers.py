"""TractoTransformer models (spec ``dwi_ml.md`` §4): TTO, TTS and TTST, with incremental decoding.

- ``OriginalTransformerModel`` (TTO): encoder on the source tokens, decoder on the target tokens.
- ``TransformerSrcOnlyModel`` (TTS): encoder only, source tokens only.
- ``TransformerSrcAndTgtModel`` (TTST): encoder only, token = [source embedding ; target embedding].

Source token i: the input features at point i, embedded. Target token i: the direction that arrived at
point i (token 0 = SOS), ``as_label`` ([dx, dy, dz, 0], SOS [0, 0, 0, 1]) or one-hot on a dipy sphere
(SOS = last class). Every attention (encoder, decoder, cross) is causal, so the output at point i depends
on points 0..i only: tracking appends one point at a time to per-layer key/value caches instead of
re-running the whole sequence (dwi_ml's O(L^3) per streamline).

State-dict layout is dwi_ml's (``dwi_ml-checkpoints.md`` §2.3) with packed ``in_proj_weight``;
``convert_loaded_state_dict`` packs the separate q/k/v weights dwi_ml stores.
Shape letters: B streamlines, T points, F features, H heads, D model width.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from trackflow.errors import TrackflowError
from trackflow.geometry.spheres import sphere_vertices
from trackflow.models.attention import (ACTIVATIONS, CacheWrite, Encoder, EncoderDecoder, KeyGroup, KVCache,
                                        attention_mask, min_group_keys, plan_key_groups)
from trackflow.models.base import MainModel, ModelConfig
from trackflow.models.rows import MIN_ROWS, aligned_rows, aligned_tokens, pad_rows_index
from trackflow.models.embeddings import make_embedding

SOS_SPHERES = ("symmetric362", "symmetric642", "symmetric724", "repulsion724", "repulsion100",
               "repulsion200")
SOS_TOKEN_TYPES = ("as_label",) + SOS_SPHERES  # ``--SOS_token_type``: a label, or a sphere's directions
POSITIONAL_ENCODING_KEYS = ("sinusoidal",)
TARGET_EMBEDDING_KEYS = ("no_embedding", "nn_embedding")


@dataclass
class TransformerConfig(ModelConfig):
    """``parameters.json`` of a TTS (checkpoints §1.4), and the keys TTO and TTST share with it."""

    max_len: int = 1000
    n_layers_e: int = 6
    positional_encoding_key: str = "sinusoidal"
    dropout_rate: float = 0.1
    activation: str = "relu"
    nheads: int = 8
    ffnn_hidden_size: int | None = None
    norm_first: bool = False


@dataclass
class TTSTConfig(TransformerConfig):
    """``parameters.json`` of a TTST."""

    sos_token_type: str = "as_label"
    target_embedding_key: str = "nn_embedding"
    target_embedded_size: int | None = None


@dataclass
class TTOConfig(TransformerConfig):
    """``parameters.json`` of a TTO."""

    sos_token_type: str = "as_label"
    target_embedding_key: str = "nn_embedding"
    n_layers_d: int | None = None


class SinusoidalPositionEncoding(nn.Module):
    """Fixed sin/cos table added to the tokens (no sqrt(D) scaling).

    ``pos_emb`` [1, max_len, D] is a persistent float32 buffer (dwi_ml saves it, so a loaded table wins).
    """

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        positions = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequencies = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                                * (-math.log(10000.0) / d_model))
        table = torch.zeros(1, max_len, d_model)
        table[0, :, 0::2] = torch.sin(positions * frequencies)
        table[0, :, 1::2] = torch.cos(positions * frequencies)
        self.register_buffer("pos_emb", table)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, D] plus the table at positions [B or 1, T]."""
        return tokens + self.pos_emb[0, positions]


# Most steps between two plans of the key groups (one host sync each); in between, every group's width
# grows by one per step, which is where it would be if every row kept growing.
REPLAN_EVERY = 8
# Cache positions per slot at the start of tracking; the caches double (up to max_points) when a plan or a
# prefill needs more, so their memory follows the longest streamline in flight, not the length limit.
INITIAL_CACHE_POSITIONS = 32


def _each_cache(caches):
    """Every KVCache of a model's nested ``caches`` (lists and tuples per layer and module)."""
    if isinstance(caches, KVCache):
        yield caches
        return
    for item in caches:
        yield from _each_cache(item)


@dataclass
class TransformerTrackingState:
    """Per-slot caches of one tracking run (see ``MainModel.new_tracking_state``).

    caches: the model's per-layer key/value caches, each [S, H, capacity, D/H]; ``reserve`` grows them all.
    consumed: LongTensor [S], points consumed per slot (cache positions 0 .. consumed-1 are real).
    plan: key groups of slots (``plan_key_groups`` on the slots of a call: slots, longest length, in place),
        planned at a step from the rows' lengths, then kept for up to ``REPLAN_EVERY`` steps, each of which
        widens every group by one position (by the slot invariant a step adds at most one point per slot).
        Planning reads the lengths on the host (a GPU sync), so it waits for new rows (a reset, or another
        number of rows) or for the widths to drift too far from the lengths. Between plans the calls' rows
        must be among the slots of the call that planned (the tracker's rows are fixed between its checks).
    """

    volume: torch.Tensor  # [X, Y, Z, F]
    max_points: int
    caches: list
    consumed: torch.Tensor
    min_keys: int  # fewest positions a key group attends over (``attention.min_group_keys``)
    plan: list | None = None
    planned_rows: int = 0
    steps_since_plan: int = 0

    @property
    def n_slots(self) -> int:
        return self.consumed.shape[0]

    @property
    def capacity(self) -> int:
        """Positions the caches hold per slot (every cache the same)."""
        return next(_each_cache(self.caches)).capacity

    def reserve(self, n_positions: int) -> None:
        """Make the caches hold at least ``n_positions`` positions (at most max_points): doubled at least,
        so that growing costs a copy per doubling."""
        needed = min(n_positions, self.max_points)
        if needed > self.capacity:
            grown = min(self.max_points, max(needed, 2 * self.capacity))
            for cache in _each_cache(self.caches):
                cache.grow(grown)

    def key_groups(self, rows: torch.Tensor) -> list[KeyGroup]:
        """This step's key groups for rows [B] (``consumed`` already holds their lengths)."""
        if self.plan is None or self.steps_since_plan >= REPLAN_EVERY or len(rows) != self.planned_rows:
            slots = rows.unique()
            lengths = self.consumed[slots].cpu().numpy()
            self.plan = [(slots[torch.as_tensor(index, device=rows.device)], longest, in_place)
                         for index, longest, in_place in plan_key_groups(lengths, self.n_slots, self.min_keys)]
            self.planned_rows, self.steps_since_plan = len(rows), 0
            # Until the next plan a row writes at most REPLAN_EVERY - 1 positions past the longest now.
            self.reserve(max(self.min_keys, int(lengths.max()) + REPLAN_EVERY))
        widening = self.steps_since_plan
        self.steps_since_plan += 1
        # At least min_keys positions (or all the caches hold, when max_points is smaller): a row's result
        # does not depend on the width of its group then (see ``attention.KEY_ELEMENTS``).
        return [KeyGroup(slots, min(max(longest + widening, self.min_keys), self.capacity), in_place,
                         self.consumed if in_place else self.consumed[slots])
                for slots, longest, in_place in self.plan]


class _TractoTransformer(MainModel):
    """Shared parts of the three models: tokens, positional encoding, masks, forward and tracking.

    Parameters (besides ``MainModel``'s; names and defaults of dwi_ml's ``parameters.json``)
    ----------
    max_len : int
        Longest sequence (positional-encoding table size); longer sequences are refused.
    n_layers_e : int
        Encoder layers.
    positional_encoding_key : {'sinusoidal'}
    dropout_rate : float
        After the positional encoding and inside the layers.
    activation : {'relu', 'gelu'}
    nheads : int
    ffnn_hidden_size : int or None
        Feed-forward width; None gives D // 2.
    norm_first : bool
        Pre-norm layers when True.
    """

    uses_target_tokens = False

    def __init__(self, *, max_len=1000, n_layers_e=6, positional_encoding_key="sinusoidal",
                 dropout_rate=0.1, activation="relu", nheads=8, ffnn_hidden_size=None, norm_first=False,
                 **main_params):
        if main_params.get("input_embedding_key") == "cnn_embedding":
            raise TrackflowError("cnn_embedding cannot be used with transformers (no un-flattening).")
        super().__init__(**main_params)
        if positional_encoding_key not in POSITIONAL_ENCODING_KEYS:
            raise TrackflowError(f"positional_encoding_key must be 'sinusoidal', got {positional_encoding_key!r}.")
        if activation not in ACTIVATIONS:
            raise TrackflowError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        if not 0.0 <= dropout_rate <= 1.0:
            raise TrackflowError(f"--dropout_rate must be in [0, 1], got {dropout_rate}")
        if not isinstance(norm_first, bool):
            raise TrackflowError(f"norm_first must be a boolean (true/false), got {norm_first!r}.")
        for name, value in (("max_len", max_len), ("n_layers_e", n_layers_e), ("nheads", nheads)):
            _check_positive_int(name, value)
        self.max_len = max_len
        self.n_layers_e = n_layers_e
        self.positional_encoding_key = positional_encoding_key
        self.dropout_rate = dropout_rate
        self.activation = activation
        self.nheads = nheads
        self.norm_first = norm_first
        self.ffnn_hidden_size = ffnn_hidden_size  # completed once D is known (_build_layers)

    # ----- construction helpers for the subclasses -----

    def _build_target_tokens(self, sos_token_type: str) -> int:
        """Set up the target-token encoding; returns the token width Tin (4, or vertices + 1)."""
        self.sos_token_type = sos_token_type
        if sos_token_type == "as_label":
            self.register_buffer("sos_vertices", None, persistent=False)
            return 4
        if sos_token_type not in SOS_SPHERES:
            raise TrackflowError(f"sos_token_type must be 'as_label' or one of {SOS_SPHERES}, "
                                 f"got {sos_token_type!r}.")
        # The file order of dipy's vertices is the class index; not in the state dict (dwi_ml layout).
        vertices = torch.as_tensor(sphere_vertices(sos_token_type), dtype=torch.float32)
        self.register_buffer("sos_vertices", vertices, persistent=False)  # [V, 3]
        return vertices.shape[0] + 1

    def _build_layers(self, d_model: int) -> dict:
        """Check D, add the positional encoding and dropout; returns the layer keyword arguments."""
        if d_model % 2 or d_model <= 3 or d_model % self.nheads:
            raise TrackflowError(f"the model width ({d_model}) must be even, > 3 and divisible by "
                                 f"nheads ({self.nheads}).")
        if self.ffnn_hidden_size is None:
            self.ffnn_hidden_size = d_model // 2
        _check_positive_int("ffnn_hidden_size", self.ffnn_hidden_size)
        self.d_model = d_model
        self.position_encoding_layer = SinusoidalPositionEncoding(d_model, self.max_len)
        self.dropout = nn.Dropout(self.dropout_rate)
        return dict(d_model=d_model, nheads=self.nheads, ffnn_hidden_size=self.ffnn_hidden_size,
                    dropout=self.dropout_rate, activation=self.activation, norm_first=self.norm_first)

    def params_for_checkpoint(self) -> dict:
        return {**super().params_for_checkpoint(), "max_len": self.max_len, "n_layers_e": self.n_layers_e,
                "positional_encoding_key": self.positional_encoding_key, "dropout_rate": self.dropout_rate,
                "activation": self.activation, "nheads": self.nheads,
                "ffnn_hidden_size": self.ffnn_hidden_size, "norm_first": self.norm_first}

    @classmethod
    def convert_loaded_state_dict(cls, state_dict: dict, params: dict) -> dict:
        """Pack dwi_ml's separate ``q/k/v_proj_weight`` [D, D] into ``in_proj_weight`` [3D, D] (q, k, v)."""
        state_dict = dict(super().convert_loaded_state_dict(state_dict, params))
        for key in [k for k in state_dict if k.endswith(".q_proj_weight")]:
            prefix = key[: -len("q_proj_weight")]
            state_dict[prefix + "in_proj_weight"] = torch.cat(
                [state_dict.pop(prefix + f"{name}_proj_weight") for name in "qkv"], dim=0)
        return state_dict

    # ----- tokens -----

    def _encode_directions(self, directions: torch.Tensor, is_sos: torch.Tensor) -> torch.Tensor:
        """Target tokens from arriving directions [..., 3] (raw, voxel units) and SOS flags [...].

        Returns [..., Tin]: as_label [dx, dy, dz, 0] / SOS [0, 0, 0, 1]; or one-hot of the vertex with the
        largest dot product (a zero vector gives class 0) / SOS = last class.
        """
        if self.sos_vertices is None:
            # [dx, dy, dz, 0], or [0, 0, 0, 1] at SOS: built in place (a constant tensor copied to the GPU
            # at every step would make the host wait for it)
            tokens = torch.cat([directions, is_sos[..., None].to(directions.dtype)], dim=-1)
            tokens[..., :3].masked_fill_(is_sos[..., None], 0.0)
            return tokens
        classes = (directions @ self.sos_vertices.T).argmax(dim=-1)
        classes = torch.where(is_sos, self.sos_vertices.shape[0], classes)
        return nn.functional.one_hot(classes, self.sos_vertices.shape[0] + 1).to(directions.dtype)

    def _sequence_target_tokens(self, points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Target tokens of whole sequences: points [B, T, 3], lengths [B] -> [B, T, Tin], zero on padding."""
        arriving = torch.zeros_like(points)
        arriving[:, 1:] = points[:, 1:] - points[:, :-1]
        positions = torch.arange(points.shape[1], device=points.device)
        tokens = self._encode_directions(arriving, (positions == 0).expand(points.shape[:2]))
        is_real = positions < lengths[:, None]
        # torch.where, not a product: padded points may be NaN.
        return torch.where(is_real[..., None], tokens, 0.0)

    # ----- the network, implemented by each model -----

    @abc.abstractmethod
    def _hidden_states(self, sources: torch.Tensor, targets: torch.Tensor | None, positions: torch.Tensor,
                       mask: torch.Tensor, caches: list | None, write: CacheWrite | None) -> torch.Tensor:
        """Last hidden states [B, T, D] from input features [B, T, Fin] and target tokens [B, T, Tin].

        positions [B or 1, T]: sequence position of each token; mask [B, 1, T, keys] (True = attend).
        With caches/write, keys and values are stored in (and read from) the caches.
        """

    @abc.abstractmethod
    def _new_caches(self, n_slots: int, max_points: int, device, dtype) -> list:
        """The ``caches`` argument of ``_hidden_states``: one KVCache per attention module."""

    # ----- whole-sequence forward -----

    def forward(self, inputs: list, streamlines: list) -> torch.Tensor:
        """Raw head outputs at every point: lists of [T_i, Fin] and [T_i, 3] -> [sum T_i, K]."""
        if len(inputs) != len(streamlines):
            raise TrackflowError(f"got {len(inputs)} input sequences but {len(streamlines)} streamlines.")
        lengths = torch.tensor([len(x) for x in inputs], device=inputs[0].device)
        if any(len(x) != len(s) for x, s in zip(inputs, streamlines)):
            raise TrackflowError("each streamline must have as many points as its input sequence.")
        if int(lengths.min()) < 1:
            raise TrackflowError("empty streamlines cannot go through a transformer.")
        n_points = int(lengths.max())
        self._check_length(n_points)
        sources = pad_sequence(inputs, batch_first=True)  # [B, T, Fin]
        targets = None
        if self.uses_target_tokens:
            targets = self._sequence_target_tokens(pad_sequence(streamlines, batch_first=True), lengths)
        positions = torch.arange(n_points, device=lengths.device)[None]  # [1, T]
        hidden = self._hidden_states(sources, targets, positions,
                                     attention_mask(positions, n_points, lengths), None, None)
        return self.direction_getter(hidden[positions < lengths[:, None]])  # real points, row-major

    def _check_length(self, n_points: int) -> None:
        if n_points > self.max_len:
            raise TrackflowError(f"sequences of {n_points} points exceed the model's max_len ({self.max_len}).")

    # ----- tracking (incremental decoding) -----

    def new_tracking_state(self, volume: torch.Tensor, n_slots: int, max_points: int
                           ) -> TransformerTrackingState:
        """Key/value caches [n_slots, H, positions, D/H] per attention layer, on the volume's device; they
        start small and grow with the streamlines (``TransformerTrackingState.reserve``) up to max_points."""
        self._check_length(max_points)
        dtype = self.position_encoding_layer.pos_emb.dtype
        min_keys = min_group_keys(self.d_model // self.nheads)
        positions = min(max_points, max(INITIAL_CACHE_POSITIONS, min_keys))
        return TransformerTrackingState(volume, max_points,
                                        self._new_caches(n_slots, positions, volume.device, dtype),
                                        torch.zeros(n_slots, dtype=torch.long, device=volume.device), min_keys)

    @property
    def tracking_window(self) -> int:
        """The last point; with target tokens also the one before it (the token is the arriving direction).
        Earlier points are in the key/value caches."""
        return 2 if self.uses_target_tokens else 1

    def tracking_step(self, state: TransformerTrackingState, rows: torch.Tensor, points: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Consume point lengths-1 of each row -> head output [B, K].

        points [B, T, 3]: the end of each row's streamline, ``points[b, :min(lengths[b], T)]`` its last points,
        T >= ``tracking_window`` (``MainModel.tracking_step``); lengths [B]: points of each whole streamline,
        at most the state's max_points. Only the new token goes through the network; it attends over the
        cached positions < lengths. Rows must be distinct, except a scratch slot whose state does not
        matter. No host sync but when the key groups are planned (``TransformerTrackingState``).
        """
        if points.shape[1] > state.max_points:  # a whole padded history longer than the caches
            raise TrackflowError(f"streamlines padded to {points.shape[1]} points exceed the tracking "
                                 f"state's max_points ({state.max_points}).")
        state.consumed[rows] = lengths
        groups = state.key_groups(rows)
        # The whole step on a padded row block with aligned product rows (``models.rows``): a row's result
        # does not depend on the other rows. The padding repeats row 0, which writes the same keys again.
        n_rows = len(rows)
        pad = pad_rows_index(n_rows, rows.device)
        rows, points, lengths = rows[pad], points[pad], lengths[pad]
        last = lengths - 1
        in_window = lengths.clamp(max=points.shape[1])  # the real points of ``points``
        batch = torch.arange(len(rows), device=rows.device)
        last_points = points[batch, in_window - 1]  # [B, 3]
        sources = aligned_rows(self.compute_inputs(state.volume, last_points))[:, None]  # [B, 1, Fin]
        targets = None
        if self.uses_target_tokens:
            arriving = last_points - points[batch, (in_window - 2).clamp(min=0)]
            targets = aligned_rows(self._encode_directions(arriving, last == 0))[:, None]  # [B, 1, Tin]
        write = CacheWrite(rows, last, groups)
        hidden = self._hidden_states(sources, targets, last[:, None], None, state.caches, write)
        return self.direction_getter(aligned_rows(hidden[:, 0]))[:n_rows]

    def reset_tracking_rows(self, state: TransformerTrackingState, rows: torch.Tensor, points: torch.Tensor,
                            lengths: torch.Tensor) -> None:
        """Ragged prefill: fill the rows' caches with points[b, :lengths[b]-1] (nothing for lengths == 1).

        Positions beyond a row's prefix keep stale values; they are masked by length until overwritten.
        Rows are prefilled by power-of-two buckets of their prefix length (from MIN_ROWS points), each padded
        to its bucket's width whatever the rows in it: a row's prefill does not depend on the other rows.
        """
        prefix_lengths = lengths - 1
        state.consumed[rows] = prefix_lengths
        state.plan = None  # new lengths: the next step plans its key groups again
        has_prefix = prefix_lengths > 0
        rows, points, prefix_lengths = rows[has_prefix], points[has_prefix], prefix_lengths[has_prefix]
        if len(rows) == 0:
            return
        buckets = torch.log2(prefix_lengths.to(torch.float64)).ceil().clamp(min=math.log2(MIN_ROWS))
        for bucket in buckets.unique().tolist():
            members = (buckets == bucket).nonzero().squeeze(1)
            self._prefill(state, rows[members], points[members], prefix_lengths[members],
                          min(2 ** int(bucket), state.max_points))

    def _prefill(self, state: TransformerTrackingState, rows: torch.Tensor, points: torch.Tensor,
                 prefix_lengths: torch.Tensor, n_points: int) -> None:
        """Caches of rows [B] from their first prefix_lengths [B] (1 .. n_points) points [B, >= 1, 3].

        The products get n_points tokens per row (at least MIN_ROWS, see ``reset_tracking_rows``, so that even
        one row makes a product of MIN_ROWS rows), a multiple of ROW_BLOCK rows and aligned rows."""
        state.reserve(n_points)
        pad = pad_rows_index(len(rows), rows.device, min_rows=1)
        rows, points, prefix_lengths = rows[pad], points[pad, :n_points], prefix_lengths[pad]
        points = nn.functional.pad(points, (0, 0, 0, n_points - points.shape[1]))
        positions = torch.arange(n_points, device=rows.device)[None]  # [1, T]
        is_real = positions < prefix_lengths[:, None]  # [B, T]
        # Inputs only at real points (padding may be NaN); zeros elsewhere keep the caches finite.
        sources = points.new_zeros(*is_real.shape, self.input_size)  # [B, T, Fin]
        sources[is_real] = self.compute_inputs(state.volume, points[is_real])
        targets = (aligned_tokens(self._sequence_target_tokens(points, prefix_lengths))
                   if self.uses_target_tokens else None)
        self._hidden_states(aligned_tokens(sources), targets, positions,
                            attention_mask(positions, n_points, prefix_lengths), state.caches, CacheWrite(rows))


class TransformerSrcOnlyModel(_TractoTransformer):
    """TTS: causal encoder over the embedded input features (+ positional encoding)."""

    config_class = TransformerConfig

    def __init__(self, **params):
        super().__init__(**params)
        layer_args = self._build_layers(self.input_embedding_layer.out_size)
        self.modified_torch_transformer = Encoder(self.n_layers_e, **layer_args)
        self._build_direction_getter(self.d_model)

    def _hidden_states(self, sources, targets, positions, mask, caches, write):
        tokens = self.dropout(self.position_encoding_layer(self.input_embedding_layer(sources), positions))
        return self.modified_torch_transformer(tokens, mask, caches, write)

    def _new_caches(self, n_slots, max_points, device, dtype):
        return self.modified_torch_transformer.new_caches(n_slots, max_points, device, dtype)


class TransformerSrcAndTgtModel(_TractoTransformer):
    """TTST: causal encoder over [input embedding ; target-token embedding] (+ positional encoding).

    Extra parameters: ``sos_token_type``, ``target_embedding_key`` ('nn_embedding' or 'no_embedding'),
    ``target_embedded_size`` (required with nn_embedding; with no_embedding it is the token width).
    """

    config_class = TTSTConfig
    uses_target_tokens = True

    def __init__(self, *, sos_token_type="as_label", target_embedding_key="nn_embedding",
                 target_embedded_size=None, **params):
        super().__init__(**params)
        token_size = self._build_target_tokens(sos_token_type)
        if target_embedding_key == "no_embedding":
            if target_embedded_size not in (None, token_size):
                raise TrackflowError(f"with target no_embedding, target_embedded_size must be the token "
                                     f"width {token_size}, got {target_embedded_size}.")
            target_embedded_size = token_size
        elif target_embedded_size is None:
            raise TrackflowError("TTST needs target_embedded_size with a target embedding.")
        self.target_embedding_key = target_embedding_key
        self.embedding_layer_t = make_embedding(target_embedding_key, token_size, target_embedded_size)
        self.target_embedded_size = self.embedding_layer_t.out_size
        layer_args = self._build_layers(self.input_embedding_layer.out_size + self.target_embedded_size)
        self.modified_torch_transformer = Encoder(self.n_layers_e, **layer_args)
        self._build_direction_getter(self.d_model)

    def params_for_checkpoint(self) -> dict:
        return {**super().params_for_checkpoint(), "sos_token_type": self.sos_token_type,
                "target_embedding_key": self.target_embedding_key,
                "target_embedded_size": self.target_embedded_size}

    def _hidden_states(self, sources, targets, positions, mask, caches, write):
        tokens = torch.cat([self.input_embedding_layer(sources), self.embedding_layer_t(targets)], dim=-1)
        tokens = self.dropout(self.position_encoding_layer(tokens, positions))
        return self.modified_torch_transformer(tokens, mask, caches, write)

    def _new_caches(self, n_slots, max_points, device, dtype):
        return self.modified_torch_transformer.new_caches(n_slots, max_points, device, dtype)


class OriginalTransformerModel(_TractoTransformer):
    """TTO: causal encoder over the input embedding, causal decoder over the target tokens.

    The decoder's cross-attention is causal too (position i sees encoder positions <= i).
    Extra parameters: ``sos_token_type``, ``target_embedding_key`` (target embedded to D; no_embedding
    needs a token width equal to D), ``n_layers_d`` (None: n_layers_e). ``target_embedded_size`` is
    refused: it is always D.
    """

    config_class = TTOConfig
    uses_target_tokens = True

    def __init__(self, *, sos_token_type="as_label", target_embedding_key="nn_embedding", n_layers_d=None,
                 target_embedded_size=None, **params):
        super().__init__(**params)
        if target_embedded_size is not None:
            raise TrackflowError("TTO does not take target_embedded_size: the target embedding is the "
                                 "model width (input_embedded_size).")
        n_layers_d = self.n_layers_e if n_layers_d is None else n_layers_d
        _check_positive_int("n_layers_d", n_layers_d)
        self.n_layers_d = n_layers_d
        token_size = self._build_target_tokens(sos_token_type)
        d_model = self.input_embedding_layer.out_size
        if target_embedding_key == "no_embedding" and token_size != d_model:
            raise TrackflowError(f"TTO with target no_embedding needs target tokens of the model width "
                                 f"({d_model}), got {token_size}.")
        self.target_embedding_key = target_embedding_key
        self.embedding_layer_t = make_embedding(target_embedding_key, token_size, d_model)
        layer_args = self._build_layers(d_model)
        self.modified_torch_transformer = EncoderDecoder(self.n_layers_e, n_layers_d, **layer_args)
        self._build_direction_getter(d_model)

    def params_for_checkpoint(self) -> dict:
        return {**super().params_for_checkpoint(), "sos_token_type": self.sos_token_type,
                "target_embedding_key": self.target_embedding_key, "n_layers_d": self.n_layers_d}

    def _hidden_states(self, sources, targets, positions, mask, caches, write):
        encoder_caches, decoder_caches = caches if caches is not None else (None, None)
        # The same positional table (from 0) is added to each sequence separately.
        source_tokens = self.dropout(self.position_encoding_layer(self.input_embedding_layer(sources),
                                                                  positions))
        target_tokens = self.dropout(self.position_encoding_layer(self.embedding_layer_t(targets), positions))
        transformer = self.modified_torch_transformer
        memory = transformer.encoder(source_tokens, mask, encoder_caches, write)
        return transformer.decoder(target_tokens, memory, mask, decoder_caches, write)

    def _new_caches(self, n_slots, max_points, device, dtype):
        transformer = self.modified_torch_transformer
        return [transformer.encoder.new_caches(n_slots, max_points, device, dtype),
                transformer.decoder.new_caches(n_slots, max_points, device, dtype)]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TrackflowError(f"{name} must be a positive integer, got {value!r}.")
