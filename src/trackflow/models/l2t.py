"""Learn2track: a stacked LSTM/GRU over streamline points (spec ``dwi_ml.md`` §3).

Layout and composition follow ``dwi_ml-checkpoints.md`` §2.2 exactly, so dwi_ml's ``best_model/`` folders
load with strict state-dict loading and give the same outputs:
[input embedding, prev-dir embedding] -> Dropout -> per layer: RNN, LayerNorm, (not last) Dropout + ReLU,
skip concatenations -> direction getter.

Two ways to run the same network:
- ``forward``: whole sequences, packed (sorting handled by torch), one output row per input row;
- the tracking interface: one new point per streamline per call, hidden states kept per slot in
  preallocated tensors, read and written by row index. Tracking steps go through ``StackedRNN.step`` on
  row blocks padded to a multiple of ``ROW_BLOCK``, so a row's result never depends on which or how many
  other rows share the call. A prefix (the backward half's start) is replayed by the tracker through the
  same steps (``prefills_prefixes = False``).
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from trackflow.errors import TrackflowError
from trackflow.geometry.directions import previous_directions, previous_directions_at_last_point
from trackflow.models.base import MainModel, ModelConfig
from trackflow.models.embeddings import make_embedding
from trackflow.models.rows import aligned_rows, pad_rows_index

RNN_CLASSES = {"lstm": nn.LSTM, "gru": nn.GRU}
RNN_KEYS = tuple(RNN_CLASSES)
PREV_DIRS_EMBEDDING_KEYS = ("no_embedding", "nn_embedding")


@dataclass
class L2TConfig(ModelConfig):
    """``parameters.json`` of a Learn2TrackModel (checkpoints §1.2, §1.3); see ``Learn2TrackModel``."""

    nb_previous_dirs: int = 0
    prev_dirs_embedding_key: str | None = None
    prev_dirs_embedded_size: int | None = None
    normalize_prev_dirs: bool = True
    rnn_key: str = "lstm"
    rnn_layer_sizes: list = field(default_factory=lambda: [100, 100])
    use_skip_connection: bool = False
    use_layer_normalization: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        # Refused for new models only: the constructor ignores the key without previous directions, and
        # saved folders (dwi_ml's too) may hold that combination.
        if self.nb_previous_dirs == 0 and self.prev_dirs_embedding_key not in (None, "no_embedding"):
            raise TrackflowError(f"--prev_dirs_embedding_key {self.prev_dirs_embedding_key} needs "
                                 "--nb_previous_dirs >= 1 (there is no previous direction to embed)")


class StackedRNN(nn.Module):
    """k single-layer RNNs with optional LayerNorm, skip connections, and Dropout + ReLU between layers.

    Submodules ``rnn_<i>`` and ``layer_norm_<i>``, registered in that interleaved order (dwi_ml's layout).

    Parameters
    ----------
    rnn_key : {'lstm', 'gru'}
    input_size : int
        I, the width of the RNN input.
    layer_sizes : list of int
        L_1..L_k.
    use_skip_connection : bool
        Feed [o_i, input] to layer i+1; output [o_0, ..., o_{k-1}, input].
    use_layer_normalization : bool
    dropout : float
        Between layers only.
    """

    def __init__(self, rnn_key, input_size, layer_sizes, use_skip_connection, use_layer_normalization,
                 dropout):
        super().__init__()
        self.is_lstm = rnn_key == "lstm"
        self.layer_sizes = list(layer_sizes)
        self.use_skip_connection = use_skip_connection
        self.use_layer_normalization = use_layer_normalization
        for i, size in enumerate(self.layer_sizes):
            if i == 0:
                layer_input = input_size
            else:
                layer_input = self.layer_sizes[i - 1] + (input_size if use_skip_connection else 0)
            setattr(self, f"rnn_{i}", RNN_CLASSES[rnn_key](layer_input, size, num_layers=1, batch_first=True))
            if use_layer_normalization:
                setattr(self, f"layer_norm_{i}", nn.LayerNorm(size))
        self.dropout = nn.Dropout(dropout)
        self.output_size = (sum(self.layer_sizes) + input_size if use_skip_connection
                            else self.layer_sizes[-1])

    def forward(self, sequences, hidden=None):
        """Run all layers.

        Parameters
        ----------
        sequences : PackedSequence (data [N, I]) or Tensor[B, T, I]
        hidden : list or None
            One torch hidden state per layer ((h, c) for LSTM, h for GRU; each [1, B, L_i]) or None (zeros).

        Returns
        -------
        outputs : Tensor[N, R] (packed data order) or Tensor[B, T, R]
        new_hidden : list
            The final raw RNN states per layer, same format as ``hidden``, in batch order.
        """
        is_packed = isinstance(sequences, PackedSequence)
        rnn_input = sequences.data if is_packed else sequences
        layer_outputs, new_hidden = [], []
        layer_sequences = sequences
        for i in range(len(self.layer_sizes)):
            out, layer_hidden = getattr(self, f"rnn_{i}")(layer_sequences, None if hidden is None else hidden[i])
            new_hidden.append(layer_hidden)
            out, next_input = self._post_process(i, out.data if is_packed else out, rnn_input)
            if next_input is not None:
                layer_sequences = sequences._replace(data=next_input) if is_packed else next_input
            layer_outputs.append(out)
        return self._stack_outputs(layer_outputs, rnn_input), new_hidden

    def _post_process(self, i: int, out: torch.Tensor, rnn_input: torch.Tensor) -> tuple:
        """Layer i's output rows [N, L_i] -> (output kept for the stack, input of layer i+1 or None if last).

        Post-processing touches the output sequence only; the carried state stays raw.
        """
        if self.use_layer_normalization:
            out = getattr(self, f"layer_norm_{i}")(out)
        if i == len(self.layer_sizes) - 1:
            return out, None
        out = torch.relu(self.dropout(out))
        return out, torch.cat([out, rnn_input], dim=-1) if self.use_skip_connection else out

    def _stack_outputs(self, layer_outputs: list, rnn_input: torch.Tensor) -> torch.Tensor:
        """The stack's output rows [N, R]: every layer and the input with skip connections, else the last."""
        if self.use_skip_connection:
            return torch.cat(layer_outputs + [rnn_input], dim=-1)
        return layer_outputs[-1]

    def _cell(self, i: int, x: torch.Tensor, hidden: tuple) -> tuple:
        """One time step of layer i with torch's GRU/LSTM cell functions.

        The cells (unlike ``nn.GRU``/``nn.LSTM`` on a length-1 sequence, whose LSTM may take a oneDNN path)
        run two plain matrix products on the rows as given, so aligned rows here mean aligned products.
        They also apply sigmoid/tanh to the gate chunks row by row; the same equations written out in
        Python apply them to contiguous [B, L] tensors, whose elements past the last full SIMD vector
        round differently, which made a row depend on B (measured).

        Parameters
        ----------
        x : Tensor[B, in_i]
        hidden : tuple of Tensor[B, L_i]
            (h,) for GRU, (h, c) for LSTM.

        Returns
        -------
        tuple of Tensor[B, L_i]
            The new state, same format.
        """
        rnn = getattr(self, f"rnn_{i}")
        weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        x, h = aligned_rows(x), aligned_rows(hidden[0])
        if self.is_lstm:
            return tuple(torch.lstm_cell(x, (h, hidden[1]), *weights))
        return (gru_step(x, h, *weights),)

    def step(self, x: torch.Tensor, hidden: list) -> tuple:
        """One time step of all layers (tracking); same network as ``forward``.

        Each output row depends on its own input and state only, provided B is a multiple of ROW_BLOCK
        (the products get aligned rows here).

        Parameters
        ----------
        x : Tensor[B, I]
        hidden : list of tuple of Tensor[B, L_i]
            Per layer, (h,) for GRU, (h, c) for LSTM.

        Returns
        -------
        outputs : Tensor[B, R]
        new_hidden : list of tuple of Tensor[B, L_i]
        """
        layer_outputs, new_hidden = [], []
        layer_input = x
        for i, layer_hidden in enumerate(hidden):
            layer_state = self._cell(i, layer_input, layer_hidden)
            new_hidden.append(layer_state)
            out, layer_input = self._post_process(i, layer_state[0], x)
            layer_outputs.append(out)
        return self._stack_outputs(layer_outputs, x), new_hidden


def gru_step(x: torch.Tensor, h: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
             bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> torch.Tensor:
    """``torch.gru_cell`` (x [B, I], h [B, L] -> [B, L]) with fewer and cheaper elementwise passes.

    At tracking's sizes the passes, not the two products, were half of a GRU step, its tanh alone as much
    as the input product; the result differs from ``torch.gru_cell``'s by float rounding (~1e-7). Every
    pass runs on a column slice of a [B, 3L] gate tensor, so it runs row by row as ``torch.gru_cell``'s do:
    a row's result does not depend on B (see ``StackedRNN._cell``).
    """
    size = h.shape[1]
    input_gates = torch.nn.functional.linear(x, weight_ih, bias_ih)  # [B, 3L]: r, z, n
    hidden_gates = torch.nn.functional.linear(h, weight_hh, bias_hh)
    reset_update = hidden_gates[:, :2 * size].add_(input_gates[:, :2 * size]).sigmoid_()
    # tanh(a) = 2 sigmoid(2a) - 1: torch's CPU tanh took 4-7 times as long as these three passes (measured).
    new_gate = (input_gates[:, 2 * size:].addcmul_(hidden_gates[:, 2 * size:], reset_update[:, :size])
                .mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0))
    # h' = (1 - z) n + z h, written over the hidden n-gate columns, which are no longer needed.
    return torch.lerp(new_gate, h, reset_update[:, size:], out=hidden_gates[:, 2 * size:])


@dataclass
class L2TTrackingState:
    """Per-slot recurrent state of a Learn2TrackModel during tracking.

    Attributes
    ----------
    volume : Tensor[X, Y, Z, F]
        The input volume the tracker interpolates.
    hidden : list of tuple of Tensor
        One tuple per RNN layer: (h,) for GRU, (h, c) for LSTM; each Tensor[n_slots, L_i].
    """

    volume: torch.Tensor
    hidden: list


class Learn2TrackModel(MainModel):
    """Learn2track recurrent model (Poulin et al. 2017, dwi_ml's refactor).

    Parameters
    ----------
    nb_previous_dirs : int
        n, number of previous segment directions given at each point (0 = none).
    prev_dirs_embedding_key : {'no_embedding', 'nn_embedding'} or None
        None means no_embedding.
    prev_dirs_embedded_size : int or None
        P; with no_embedding it must be None or 3n (written back as 3n); with n = 0 it is forced to None.
    normalize_prev_dirs : bool
        Unit-normalize each previous direction.
    rnn_key : {'lstm', 'gru'}
    rnn_layer_sizes : list of int
    use_skip_connection, use_layer_normalization : bool
    dropout : float
        In [0, 1]; after the embeddings and between RNN layers.
    **common_params
        The ``MainModel`` keys (``nb_features``, ``dg_key``, ...).
    """

    config_class = L2TConfig
    # A recurrent state takes one point at a time: the tracker replays prefixes through ``tracking_step``.
    prefills_prefixes = False
    # Measured (GRU 2x64, 50,000 seeds, one thread): 3,600 seeds/s at 4,000 slots against 2,600 at 1,000
    # (the per-op cost of a step is shared by more rows); 8,000 is slower again. A few MB of state.
    default_tracking_slots = 4000

    def __init__(self, *, nb_previous_dirs=0, prev_dirs_embedding_key=None, prev_dirs_embedded_size=None,
                 normalize_prev_dirs=True, rnn_key="lstm", rnn_layer_sizes=(100, 100),
                 use_skip_connection=False, use_layer_normalization=False, dropout=0.0, **common_params):
        if not 0.0 <= dropout <= 1.0:
            raise TrackflowError(f"dropout must be in [0, 1], got {dropout}")
        if rnn_key not in RNN_CLASSES:
            raise TrackflowError(f"rnn_key must be one of {sorted(RNN_CLASSES)}, got {rnn_key!r}")
        rnn_layer_sizes = list(rnn_layer_sizes)
        if not rnn_layer_sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                      for s in rnn_layer_sizes):
            raise TrackflowError(f"rnn_layer_sizes must be a non-empty list of positive integers, "
                                 f"got {rnn_layer_sizes}")
        if isinstance(nb_previous_dirs, bool) or not isinstance(nb_previous_dirs, int) or nb_previous_dirs < 0:
            raise TrackflowError(f"nb_previous_dirs must be an integer >= 0, got {nb_previous_dirs!r}")
        if nb_previous_dirs == 0:
            prev_dirs_embedded_size = None
        else:
            prev_dirs_embedding_key = prev_dirs_embedding_key or "no_embedding"
            if prev_dirs_embedding_key not in PREV_DIRS_EMBEDDING_KEYS:
                raise TrackflowError(f"prev_dirs_embedding_key must be one of {PREV_DIRS_EMBEDDING_KEYS}, "
                                     f"got {prev_dirs_embedding_key!r}")
            if prev_dirs_embedding_key == "no_embedding":
                if prev_dirs_embedded_size not in (None, 3 * nb_previous_dirs):
                    raise TrackflowError(
                        f"prev_dirs_embedded_size must be 3 * nb_previous_dirs = {3 * nb_previous_dirs} (or "
                        f"unset) with no_embedding, got {prev_dirs_embedded_size}")
                prev_dirs_embedded_size = 3 * nb_previous_dirs
            elif prev_dirs_embedded_size is None:
                raise TrackflowError("prev_dirs_embedded_size is required with prev_dirs_embedding_key "
                                     "nn_embedding")
        super().__init__(**common_params)

        self.nb_previous_dirs = nb_previous_dirs
        self.prev_dirs_embedding_key = prev_dirs_embedding_key
        self.prev_dirs_embedded_size = prev_dirs_embedded_size
        self.normalize_prev_dirs = normalize_prev_dirs
        self.rnn_key = rnn_key
        self.rnn_layer_sizes = rnn_layer_sizes
        self.use_skip_connection = use_skip_connection
        self.use_layer_normalization = use_layer_normalization
        self.dropout = dropout

        rnn_input_size = self.input_embedding_layer.out_size
        if nb_previous_dirs > 0:
            self.prev_dirs_embedding = make_embedding(prev_dirs_embedding_key, 3 * nb_previous_dirs,
                                                      prev_dirs_embedded_size)
            rnn_input_size += self.prev_dirs_embedding.out_size
        else:
            self.prev_dirs_embedding = None
        # dwi_ml applies the embedding dropout only when the rows are actually transformed.
        self._embeds_inputs = self.input_embedding_key != "no_embedding" or nb_previous_dirs > 0
        self.embedding_dropout = nn.Dropout(dropout)
        self.rnn_model = StackedRNN(rnn_key, rnn_input_size, rnn_layer_sizes, use_skip_connection,
                                    use_layer_normalization, dropout)
        self._build_direction_getter(self.rnn_model.output_size)

    def params_for_checkpoint(self) -> dict:
        params = super().params_for_checkpoint()
        params.update({
            "nb_previous_dirs": self.nb_previous_dirs,
            "prev_dirs_embedding_key": self.prev_dirs_embedding_key,
            "prev_dirs_embedded_size": self.prev_dirs_embedded_size,
            "normalize_prev_dirs": self.normalize_prev_dirs,
            "rnn_key": self.rnn_key,
            "rnn_layer_sizes": list(self.rnn_layer_sizes),
            "use_skip_connection": self.use_skip_connection,
            "use_layer_normalization": self.use_layer_normalization,
            "dropout": self.dropout,
        })
        return params

    # ------------------------------------------------------------------ shared pieces

    def _embed(self, inputs: torch.Tensor, prev_dirs: torch.Tensor | None) -> torch.Tensor:
        """RNN input rows [N, I] from input features [N, Fin] and previous directions [N, 3n] (or None)."""
        rows = self.input_embedding_layer(inputs)
        if self.nb_previous_dirs > 0:
            rows = torch.cat([rows, self.prev_dirs_embedding(prev_dirs)], dim=-1)
        return self.embedding_dropout(rows) if self._embeds_inputs else rows

    def _run_sequences(self, rows: torch.Tensor, lengths: torch.Tensor):
        """Run the stacked RNN from zero states over concatenated ragged sequences, packed.

        Parameters
        ----------
        rows : Tensor[N, I]
            RNN inputs of all sequences, concatenated (N = sum of lengths).
        lengths : LongTensor[B]
            Sequence lengths (>= 1).

        Returns
        -------
        outputs : Tensor[N, R]
            In the same (concatenated) row order as ``rows``.
        final_hidden : list
            Final states per layer, batch order.
        """
        lengths_cpu = lengths.to("cpu", torch.int64)
        starts = (torch.cumsum(lengths, 0) - lengths).to(rows.device)
        # Row index of (b, t) in the concatenation, padded; packing it gives the packed order of the rows.
        padded_index = starts[:, None] + torch.arange(int(lengths_cpu.max()), device=rows.device)[None]
        packed_index = pack_padded_sequence(padded_index, lengths_cpu, batch_first=True, enforce_sorted=False)
        packed_rows = packed_index._replace(data=rows.index_select(0, packed_index.data))
        packed_outputs, final_hidden = self.rnn_model(packed_rows)
        unpack_order = torch.empty_like(packed_index.data)
        unpack_order[packed_index.data] = torch.arange(len(unpack_order), device=rows.device)
        return packed_outputs.index_select(0, unpack_order), final_hidden

    # ------------------------------------------------------------------ whole sequences

    def forward(self, inputs: list, streamlines: list) -> torch.Tensor:
        """Whole-sequence raw head outputs (teacher forcing).

        Parameters
        ----------
        inputs : list of Tensor[T_i, Fin]
        streamlines : list of Tensor[T_i, 3]
            Coordinates of the input rows (previous directions are taken from them).

        Returns
        -------
        Tensor[sum T_i, K]
            Rows concatenated in input order.
        """
        lengths = torch.tensor([len(x) for x in inputs])
        if len(streamlines) != len(inputs) or any(len(s) != n for s, n in zip(streamlines, lengths.tolist())):
            raise ValueError("inputs and streamlines must have the same number of rows per streamline")
        prev_dirs = None
        if self.nb_previous_dirs > 0:
            prev_dirs = torch.cat(previous_directions(streamlines, self.nb_previous_dirs,
                                                      self.normalize_prev_dirs))
        outputs, _ = self._run_sequences(self._embed(torch.cat(inputs), prev_dirs), lengths)
        return self.direction_getter(outputs)

    # ------------------------------------------------------------------ tracking

    def new_tracking_state(self, volume: torch.Tensor, n_slots: int, max_points: int) -> L2TTrackingState:
        """Zero hidden states for ``n_slots`` slots on the volume's device (``max_points`` is not needed)."""
        dtype = next(self.parameters()).dtype
        n_tensors = 2 if self.rnn_model.is_lstm else 1
        hidden = [tuple(torch.zeros(n_slots, size, dtype=dtype, device=volume.device) for _ in range(n_tensors))
                  for size in self.rnn_layer_sizes]
        return L2TTrackingState(volume=volume, hidden=hidden)

    def _embed_aligned(self, inputs: torch.Tensor, prev_dirs: torch.Tensor | None) -> torch.Tensor:
        """``_embed`` of a padded row block [B', Fin], [B', 3n] -> [B', I], with aligned product rows."""
        return self._embed(aligned_rows(inputs), None if prev_dirs is None else aligned_rows(prev_dirs))

    def _gather_hidden(self, state: L2TTrackingState, rows: torch.Tensor) -> list:
        """The rows' states: per layer a tuple of Tensor[B, L_i] ((h,) or (h, c))."""
        return [tuple(t.index_select(0, rows) for t in layer) for layer in state.hidden]

    def _scatter_hidden(self, state: L2TTrackingState, rows: torch.Tensor, hidden: list) -> None:
        """Write per-layer tuples of Tensor[B, L_i] into the rows' slots."""
        for layer, new in zip(state.hidden, hidden):
            for stored, value in zip(layer, new):
                stored.index_copy_(0, rows, value)

    @property
    def tracking_window(self) -> int:
        """The last point and the ``nb_previous_dirs`` segments that arrive at it."""
        return self.nb_previous_dirs + 1

    @torch.no_grad()
    def tracking_step(self, state: L2TTrackingState, rows: torch.Tensor, points: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Consume the last point of each row's streamline; return the head output there.

        Parameters
        ----------
        state : L2TTrackingState
        rows : LongTensor[B]
            Slot indices (the scratch slot may repeat).
        points : Tensor[B, T, 3]
            The end of each row's streamline: ``points[b, :min(lengths[b], T)]`` are its last points
            (vox/corner), T >= ``tracking_window`` (``MainModel.tracking_step``).
        lengths : LongTensor[B]
            Points of each whole streamline (>= 1).

        Returns
        -------
        Tensor[B, K]
        """
        n_rows = len(rows)
        in_window = lengths.clamp(max=points.shape[1])  # the real points of ``points``
        last_points = points[torch.arange(n_rows, device=points.device), in_window - 1]  # [B, 3]
        prev_dirs = (previous_directions_at_last_point(points, in_window, self.nb_previous_dirs,
                                                       self.normalize_prev_dirs)
                     if self.nb_previous_dirs > 0 else None)
        # Whole step (embedding, RNN, head) on a padded block: see ROW_BLOCK.
        pad = pad_rows_index(n_rows, rows.device)
        step_rows = self._embed_aligned(self.compute_inputs(state.volume, last_points[pad]),
                                        None if prev_dirs is None else prev_dirs[pad])  # [B', I]
        outputs, new_hidden = self.rnn_model.step(step_rows, self._gather_hidden(state, rows[pad]))
        self._scatter_hidden(state, rows, [tuple(t[:n_rows] for t in layer) for layer in new_hidden])
        return self.direction_getter(aligned_rows(outputs))[:n_rows]

    @torch.no_grad()
    def reset_tracking_rows(self, state: L2TTrackingState, rows: torch.Tensor, points: torch.Tensor,
                            lengths: torch.Tensor) -> None:
        """Zero the rows' states (new streamlines): only ``lengths == 1`` (see ``prefills_prefixes``)."""
        if bool((lengths != 1).any()):
            raise ValueError("Learn2track rebuilds a prefix through tracking steps, not reset_tracking_rows")
        for layer in state.hidden:
            for stored in layer:
                stored.index_fill_(0, rows, 0.0)
