"""Embeddings (key names, shapes, CNN cube layout) and previous-direction features, against loops in numpy."""

import numpy as np
import pytest
import torch

from trackflow.errors import TrackflowError
from trackflow.geometry.directions import previous_directions, previous_directions_at_last_point
from trackflow.geometry.neighborhood import neighborhood_offsets
from trackflow.models.embeddings import CNNEmbedding, NNEmbedding, NoEmbedding, make_embedding


def test_no_embedding_is_identity():
    embedding = make_embedding("no_embedding", 12)
    x = torch.randn(4, 12)
    assert isinstance(embedding, NoEmbedding) and embedding.out_size == 12
    assert torch.equal(embedding(x), x)
    assert len(embedding.state_dict()) == 0
    with pytest.raises(TrackflowError):
        make_embedding("no_embedding", 12, 8)


def test_nn_embedding_is_linear_then_relu():
    torch.manual_seed(0)
    embedding = make_embedding("nn_embedding", 15, 8)
    assert isinstance(embedding, NNEmbedding) and embedding.out_size == 8
    assert {k: tuple(v.shape) for k, v in embedding.state_dict().items()} == {
        "linear.weight": (8, 15), "linear.bias": (8,)}
    x = torch.randn(6, 15)
    weight, bias = embedding.linear.weight.detach().numpy(), embedding.linear.bias.detach().numpy()
    expected = np.maximum(x.numpy() @ weight.T + bias, 0)
    np.testing.assert_allclose(embedding(x).detach().numpy(), expected, atol=1e-6)
    assert (expected == 0).any()  # the ReLU is exercised
    with pytest.raises(TrackflowError):
        make_embedding("nn_embedding", 15)


def _cnn_kwargs(radius=1, resolution=1.0, filters=(4, 6), kernels=(2, 2)):
    return dict(nb_features=5, neighborhood_type="grid", neighborhood_radius=radius,
                neighborhood_resolution=resolution, nb_cnn_filters=list(filters), kernel_size=list(kernels))


def test_cnn_state_dict_shapes_match_checkpoint_example():
    # checkpoints §2.1: F=5, r=1, filters [4, 6], kernels [2, 2] -> cnn_0 [4,5,2,2,2], cnn_1 [6,4,2,2,2], E=6.
    embedding = make_embedding("cnn_embedding", 27 * 5, **_cnn_kwargs())
    assert isinstance(embedding, CNNEmbedding) and embedding.out_size == 6
    assert {k: tuple(v.shape) for k, v in embedding.state_dict().items()} == {
        "cnn_0.weight": (4, 5, 2, 2, 2), "cnn_0.bias": (4,), "cnn_1.weight": (6, 4, 2, 2, 2), "cnn_1.bias": (6,)}


def _numpy_conv3d_relu(cube, weight, bias):
    """Valid 3D convolution (cross-correlation) + ReLU by loops: cube [X, Y, Z, C] -> [X', Y', Z', C']."""
    k = weight.shape[-1]
    side = cube.shape[0] - k + 1
    out = np.zeros((side, side, side, weight.shape[0]))
    for x in range(side):
        for y in range(side):
            for z in range(side):
                patch = cube[x:x + k, y:y + k, z:z + k, :]  # [k, k, k, C]
                out[x, y, z] = np.einsum("xyzc,fcxyz->f", patch, weight) + bias
    return np.maximum(out, 0)


def test_cnn_forward_matches_cube_reference():
    torch.manual_seed(1)
    radius, features = 1, 5
    embedding = make_embedding("cnn_embedding", 27 * features, **_cnn_kwargs(kernels=(2, 1), filters=(3, 4)))
    x = torch.randn(3, 27 * features)
    offsets = neighborhood_offsets("grid", radius, 1.0).numpy()
    out = embedding(x).detach().numpy()
    for row in range(3):
        cube = np.zeros((3, 3, 3, features))
        for m, offset in enumerate(offsets):  # neighbour m sits at cell offset + r (x, y, z)
            cell = tuple((offset + radius).astype(int))
            cube[cell] = x[row, m * features:(m + 1) * features].numpy()
        for i in range(2):
            layer = getattr(embedding, f"cnn_{i}")
            cube = _numpy_conv3d_relu(cube, layer.weight.detach().double().numpy(),
                                      layer.bias.detach().double().numpy())
        np.testing.assert_allclose(out[row], cube.reshape(-1), atol=1e-5)  # x slowest, channel fastest


def test_cnn_truncation_quirk_leaves_empty_cells():
    # r = 3, res = 0.3: 3 * 0.3 / 0.3 truncates to 2, so the +-3 neighbours overwrite the +-2 ones.
    embedding = CNNEmbedding(1, 3, 0.3, [1], [1])
    assert len(embedding._cells) < 7 ** 3
    assert len(CNNEmbedding(1, 3, 0.5, [1], [1])._cells) == 7 ** 3
    offsets = neighborhood_offsets("grid", 3, 0.3)
    x = torch.arange(len(offsets), dtype=torch.float32)[None]  # feature = neighbour index
    with torch.no_grad():
        embedding.cnn_0.weight.fill_(1.0)
        embedding.cnn_0.bias.zero_()
    cube = embedding(x).reshape(7, 7, 7)
    # Cell (2+3, 3, 3) holds the last neighbour written there: (+3, 0, 0) comes after (+2, 0, 0).
    last = max(m for m, o in enumerate(offsets.tolist()) if o[1] == 0 and o[2] == 0 and o[0] > 0.5)
    assert cube[5, 3, 3].item() == last
    assert (cube == 0).sum() > 1  # origin is neighbour 0, plus the cells nobody reaches


@pytest.mark.parametrize("kwargs", [dict(neighborhood_type="axes"), dict(kernel_size=[4, 1]),
                                    dict(kernel_size=[2]), dict(kernel_size=[3, 2])])
def test_cnn_bad_configurations_rejected(kwargs):
    with pytest.raises(TrackflowError):
        make_embedding("cnn_embedding", 27 * 5, **{**_cnn_kwargs(), **kwargs})


def test_unknown_embedding_key():
    with pytest.raises(TrackflowError):
        make_embedding("rnn_embedding", 3, 3)


def _reference_previous_dirs(points, n, normalize):
    """[T, 3n] by loops: row t = [d_{t-1}, ..., d_{t-n}], d_j = p_{j+1} - p_j, zeros if missing or zero."""
    rows = np.zeros((len(points), 3 * n))
    for t in range(len(points)):
        for k in range(1, n + 1):
            j = t - k
            if j >= 0:
                d = points[j + 1] - points[j]
                norm = np.linalg.norm(d)
                if normalize:
                    d = d / norm if norm > 0 else np.zeros(3)
                rows[t, 3 * (k - 1):3 * k] = d
    return rows


def _streamlines():
    rng = np.random.default_rng(4)
    lines = [rng.normal(size=(length, 3)) for length in (5, 1, 3, 2, 7)]
    lines[4][3] = lines[4][2]  # a zero-length segment
    return [torch.tensor(line, dtype=torch.float32) for line in lines]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_previous_directions_list_and_padded(n, normalize):
    lines = _streamlines()
    from_list = previous_directions(lines, n, normalize)
    padded = torch.nn.utils.rnn.pad_sequence(lines, batch_first=True)
    from_padded = previous_directions(padded, n, normalize)
    assert from_padded.shape == (len(lines), padded.shape[1], 3 * n)
    for i, line in enumerate(lines):
        expected = _reference_previous_dirs(line.double().numpy(), n, normalize)
        assert not torch.isnan(from_list[i]).any()
        np.testing.assert_allclose(from_list[i].numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(from_padded[i, :len(line)].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_previous_directions_at_last_point_equals_whole_sequence(normalize):
    lines = _streamlines()
    padded = torch.nn.utils.rnn.pad_sequence(lines, batch_first=True, padding_value=99.0)
    lengths = torch.tensor([len(line) for line in lines])
    last = previous_directions_at_last_point(padded, lengths, 2, normalize)
    whole = previous_directions(lines, 2, normalize)
    assert last.shape == (len(lines), 6)
    for i, line in enumerate(lines):
        torch.testing.assert_close(last[i], whole[i][-1])


def test_zero_previous_directions_give_empty_features():
    lines = _streamlines()
    assert [f.shape for f in previous_directions(lines, 0, True)] == [(len(line), 0) for line in lines]
    lengths = torch.tensor([len(line) for line in lines])
    padded = torch.nn.utils.rnn.pad_sequence(lines, batch_first=True)
    assert previous_directions_at_last_point(padded, lengths, 0, True).shape == (len(lines), 0)
