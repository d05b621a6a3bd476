"""Previous-direction features of streamlines (spec §3.1, checkpoints §3.2): the segment directions that
arrived at each point, most recent first, as fed to Learn2track."""

import torch
import torch.nn.functional as F


def _previous_directions_flat(points: torch.Tensor, point_index: torch.Tensor, nb_previous_dirs: int,
                              normalize: bool) -> torch.Tensor:
    """Previous directions of consecutive streamlines stored one after another.

    ``points`` [P, 3]; ``point_index`` [P] is each point's index inside its own streamline (0 at a
    streamline start), which tells where the sequences break. Returns [P, 3 * nb_previous_dirs].
    """
    # Direction arriving at each point: p[g] - p[g-1], zero at a streamline start.
    arriving = torch.zeros_like(points)
    arriving[1:] = points[1:] - points[:-1]
    arriving = arriving * (point_index >= 1)[:, None]
    if normalize:
        # F.normalize divides by max(norm, eps): a zero-length segment stays zero instead of NaN.
        arriving = F.normalize(arriving, dim=-1)
    features = []
    for k in range(1, nb_previous_dirs + 1):  # n is small; each step is vectorised over all points
        shifted = torch.zeros_like(arriving)
        shifted[k - 1:] = arriving[:arriving.shape[0] - (k - 1)]
        features.append(shifted * (point_index >= k)[:, None])
    if not features:
        return points.new_zeros(points.shape[0], 0)
    return torch.cat(features, dim=-1)


def previous_directions(points: torch.Tensor | list[torch.Tensor], nb_previous_dirs: int,
                        normalize: bool) -> torch.Tensor | list[torch.Tensor]:
    """The ``nb_previous_dirs`` most recent segment directions at every point (spec §3.1, checkpoints §3.2).

    At point t the row is [d_{t-1}, d_{t-2}, ..., d_{t-n}] with d_j = p_{j+1} - p_j, most recent first;
    missing directions (start of the streamline) are zero vectors. With ``normalize`` each direction is
    unit length, except zero-length segments which stay zero (dwi_ml gives NaN there).

    Parameters
    ----------
    points : torch.Tensor or list of torch.Tensor
        Padded [B, T, 3] (padding rows only affect themselves) or a list of [T_i, 3].
    nb_previous_dirs : int
        n >= 1.
    normalize : bool

    Returns
    -------
    torch.Tensor or list of torch.Tensor
        [B, T, 3n], or a list of [T_i, 3n] for list input.
    """
    if isinstance(points, torch.Tensor):
        n_streamlines, n_points, _ = points.shape
        point_index = torch.arange(n_points, device=points.device).repeat(n_streamlines)
        flat = _previous_directions_flat(points.reshape(-1, 3), point_index, nb_previous_dirs, normalize)
        return flat.reshape(n_streamlines, n_points, -1)
    lengths = [len(p) for p in points]
    if not lengths:
        return []
    device = points[0].device
    lengths_tensor = torch.tensor(lengths, device=device)
    starts = torch.cumsum(lengths_tensor, 0) - lengths_tensor
    point_index = torch.arange(int(lengths_tensor.sum()), device=device) - starts.repeat_interleave(lengths_tensor)
    flat = _previous_directions_flat(torch.cat(points), point_index, nb_previous_dirs, normalize)
    return list(torch.split(flat, lengths))


def previous_directions_at_last_point(points: torch.Tensor, lengths: torch.Tensor, nb_previous_dirs: int,
                                      normalize: bool) -> torch.Tensor:
    """Previous-direction features at the last real point of each padded streamline (tracking).

    Same definition as ``previous_directions``: row b is [d_{L-2}, d_{L-3}, ..., d_{L-1-n}] for
    L = lengths[b], zeros where the streamline is too short.

    Parameters
    ----------
    points : torch.Tensor
        [B, T, 3] padded streamlines.
    lengths : torch.Tensor
        [B] long, number of real points of each row, 1 <= L <= T.
    nb_previous_dirs : int
    normalize : bool

    Returns
    -------
    torch.Tensor
        [B, 3n].
    """
    k = torch.arange(1, nb_previous_dirs + 1, device=points.device)
    head = lengths.to(points.device)[:, None] - k[None, :]  # [B, n] index of the segment's end point
    tail = head - 1
    valid = tail >= 0
    rows = torch.arange(points.shape[0], device=points.device)[:, None]
    directions = points[rows, head.clamp_min(0)] - points[rows, tail.clamp_min(0)]  # [B, n, 3]
    if normalize:
        directions = F.normalize(directions, dim=-1)
    directions = directions * valid[..., None]
    return directions.reshape(points.shape[0], 3 * nb_previous_dirs)
