"""Tractometer-style scoring of a tractogram against ground-truth bundles.

Definitions (Côté et al. 2013; overreach as in the ISMRM 2015 challenge, Maier-Hein et al. 2017):

- Each ground-truth bundle b has two endpoint regions (``head``, ``tail``) and a volume mask.
- A streamline is a **valid connection** (VS) of bundle b when one endpoint lies in head_b and the other in
  tail_b. When it connects two endpoint regions that are not the two ends of one bundle it is an
  **invalid connection** (IS); when an endpoint lies in no region it is **no connection** (NC).
- VB: bundles with at least one valid streamline. IB: distinct unordered pairs of regions joined by invalid
  streamlines (a region = one end of one bundle).
- Per bundle, with V = voxels crossed by its valid streamlines and M its mask:
  OL = |V ∩ M| / |M| (overlap), OR = |V \\ M| / |M| (overreach, relative to the ground-truth volume — the
  ISMRM 2015 definition, not scilpy's |V \\ M| / |V|), F1 = Dice of V and M = 2|V ∩ M| / (|V| + |M|).
- Overall OL, OR and F1 are means over all ground-truth bundles (a bundle never found counts 0, 0, 0).

All computations are in voxel coordinates with corner origin: the voxel of point p is floor(p).
"""

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_dilation

from trackflow.data.tractograms import load_tractogram_file
from trackflow.errors import TrackflowError

# Streamlines are densified so that consecutive samples are at most this far apart (voxels): the voxels a
# segment crosses are then all visited.
MAX_SAMPLE_SPACING_VOX = 0.25


@dataclass
class GroundTruthBundle:
    name: str
    head: np.ndarray  # bool [X, Y, Z]
    tail: np.ndarray  # bool [X, Y, Z]
    mask: np.ndarray  # bool [X, Y, Z]


def load_ground_truth(bundles_dir, dilate_endpoints: int = 1):
    """Read ``<s>__<bundle>__{head,tail,mask}.nii.gz`` files of one subject.

    Returns (bundles sorted by name, reference image). Endpoint regions are dilated by
    ``dilate_endpoints`` voxels: trackers stop on the first point outside the tracking mask, one voxel
    beyond the ground-truth endpoints.
    """
    if dilate_endpoints < 0:
        raise TrackflowError(f"--dilate_endpoints must be >= 0 voxels, got {dilate_endpoints}")
    bundles_dir = Path(bundles_dir)
    # A bundle is named by any of its three files, so that one missing file is an error, not a lost bundle.
    stems = sorted({path.name[: -len(f"__{part}.nii.gz")] for part in ("head", "tail", "mask")
                    for path in bundles_dir.glob(f"*__{part}.nii.gz")})
    if not stems:
        raise TrackflowError(f"no ground-truth bundles (*__head.nii.gz) in {bundles_dir}")
    bundles, reference = [], None
    for stem in stems:
        name = stem.split("__", 1)[1] if "__" in stem else stem
        images, data = {}, {}
        for part in ("head", "tail", "mask"):
            images[part], data[part] = _read_mask(bundles_dir / f"{stem}__{part}.nii.gz")
            if not data[part].any():
                raise TrackflowError(f"the {part} of ground-truth bundle {name} is empty "
                                     f"({stem}__{part}.nii.gz has no voxel > 0)")
        if reference is None:
            reference = images["mask"]
        for part, img in images.items():
            if img.shape[:3] != reference.shape[:3] or not np.allclose(img.affine, reference.affine,
                                                                           atol=1e-4):
                raise TrackflowError(f"{stem}__{part}.nii.gz does not share the grid of the other masks")
        if dilate_endpoints > 0:
            for part in ("head", "tail"):
                data[part] = binary_dilation(data[part], iterations=dilate_endpoints)
        bundles.append(GroundTruthBundle(name, data["head"], data["tail"], data["mask"]))
    return bundles, reference


def _read_mask(path: Path):
    """(image, voxels > 0) of a ground-truth mask file."""
    if not path.exists():
        raise TrackflowError(f"missing ground-truth file {path}")
    try:
        img = nib.load(path)
        return img, np.asanyarray(img.dataobj) > 0
    except Exception as e:  # nibabel, gzip and zlib raise many types for truncated or garbage files
        raise TrackflowError(f"cannot read ground-truth mask {path}: {e}") from None


def densify_to_voxels(streamlines_vox, shape):
    """Voxel indices crossed by each streamline (vox/corner coordinates).

    Returns (flat voxel index per sample [P'], streamline id per sample [P']); samples outside the
    volume are dropped.
    """
    lengths = np.array([len(s) for s in streamlines_vox], dtype=np.int64)
    if lengths.sum() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    points = np.concatenate(streamlines_vox).astype(np.float64)
    ids = np.repeat(np.arange(len(lengths)), lengths)
    # Segments join consecutive points of the same streamline only.
    same = ids[1:] == ids[:-1]
    starts, ends, seg_ids = points[:-1][same], points[1:][same], ids[:-1][same]
    n_sub = np.maximum(1, np.ceil(np.linalg.norm(ends - starts, axis=1) / MAX_SAMPLE_SPACING_VOX)
                       ).astype(np.int64)
    seg_of_sample = np.repeat(np.arange(len(starts)), n_sub)
    offsets_in_seg = np.arange(n_sub.sum()) - np.repeat(np.cumsum(n_sub) - n_sub, n_sub)
    t = (offsets_in_seg / n_sub[seg_of_sample])[:, None]
    samples = starts[seg_of_sample] * (1 - t) + ends[seg_of_sample] * t
    # Add every original point too (covers the last point and one-point streamlines).
    samples = np.concatenate([samples, points])
    sample_ids = np.concatenate([seg_ids[seg_of_sample], ids])
    vox = np.floor(samples).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape[:3])), axis=1)
    flat = np.ravel_multi_index(vox[inside].T, shape[:3])
    return flat, sample_ids[inside]


def _region_of_points(points_vox, bundles):
    """[P, 2B] bool: whether each point lies in each region (head_0, tail_0, head_1, ...)."""
    shape = bundles[0].mask.shape
    vox = np.floor(points_vox).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    clipped = np.clip(vox, 0, np.asarray(shape) - 1)
    regions = np.stack([r for b in bundles for r in (b.head, b.tail)])  # [2B, X, Y, Z]
    hits = regions[:, clipped[:, 0], clipped[:, 1], clipped[:, 2]].T
    return hits & inside[:, None]


def _classify_connections(streamlines_vox, bundles):
    """Per streamline: its valid bundle ([S] int, -1 if none), invalid and no-connection flags ([S] bool);
    and IB, the count of distinct region pairs joined by invalid streamlines."""
    n_bundles = len(bundles)
    if len(streamlines_vox):
        first = np.stack([s[0] for s in streamlines_vox])
        last = np.stack([s[-1] for s in streamlines_vox])
        in_first, in_last = _region_of_points(first, bundles), _region_of_points(last, bundles)
    else:
        in_first = in_last = np.zeros((0, 2 * n_bundles), bool)

    heads, tails = in_first[:, 0::2], in_first[:, 1::2]
    heads_l, tails_l = in_last[:, 0::2], in_last[:, 1::2]
    valid_per_bundle = (heads & tails_l) | (tails & heads_l)  # [S, B]
    # A streamline valid for several overlapping bundles goes to the first one (bundles are disjoint in
    # the demo; the tie rule only keeps counts consistent).
    valid_bundle = np.where(valid_per_bundle.any(axis=1), valid_per_bundle.argmax(axis=1), -1)
    connected = in_first.any(axis=1) & in_last.any(axis=1)
    invalid = connected & (valid_bundle < 0)
    no_connection = ~connected

    region_pairs = np.sort(np.stack([in_first[invalid].argmax(axis=1),
                                     in_last[invalid].argmax(axis=1)], axis=1), axis=1)
    return valid_bundle, invalid, no_connection, len(np.unique(region_pairs, axis=0))


def _bundle_metrics(streamlines_vox, bundles, valid_bundle: np.ndarray) -> dict:
    """Bundle name -> VS, OL, OR, F1 of the streamlines assigned to it."""
    shape = bundles[0].mask.shape
    flat, sample_ids = densify_to_voxels(streamlines_vox, shape)
    per_bundle = {}
    for b_index, bundle in enumerate(bundles):
        chosen = valid_bundle[sample_ids] == b_index
        covered = np.zeros(np.prod(shape), bool)
        covered[flat[chosen]] = True
        mask = bundle.mask.ravel()
        overlap = int(np.sum(covered & mask))
        overreach = int(np.sum(covered & ~mask))
        mask_size = int(mask.sum())
        n_valid = int(np.sum(valid_bundle == b_index))
        per_bundle[bundle.name] = {
            "VS": n_valid,
            "OL": overlap / mask_size if mask_size else 0.0,
            "OR": overreach / mask_size if mask_size else 0.0,
            "F1": 2 * overlap / (int(covered.sum()) + mask_size) if n_valid else 0.0,
        }
    return per_bundle


def score_streamlines(streamlines_vox, bundles):
    """Score streamlines given in vox/corner coordinates of the ground truth's grid.

    Returns a dict of overall metrics and a ``bundles`` dict of per-bundle metrics (JSON-serialisable).
    """
    n_streamlines = len(streamlines_vox)
    valid_bundle, invalid, no_connection, n_invalid_bundles = _classify_connections(streamlines_vox, bundles)
    per_bundle = _bundle_metrics(streamlines_vox, bundles, valid_bundle)
    n_valid = int(np.sum(valid_bundle >= 0))

    def ratio(count):
        return count / n_streamlines if n_streamlines else 0.0

    return {
        "n_streamlines": n_streamlines,
        "VB": int(sum(1 for m in per_bundle.values() if m["VS"] > 0)),
        "n_bundles": len(bundles),
        "IB": n_invalid_bundles,
        "VS": n_valid, "VS_ratio": ratio(n_valid),
        "IS": int(invalid.sum()), "IS_ratio": ratio(int(invalid.sum())),
        "NC": int(no_connection.sum()), "NC_ratio": ratio(int(no_connection.sum())),
        "OL": float(np.mean([m["OL"] for m in per_bundle.values()])),
        "OR": float(np.mean([m["OR"] for m in per_bundle.values()])),
        "F1": float(np.mean([m["F1"] for m in per_bundle.values()])),
        "OR_definition": "ISMRM 2015: voxels of valid streamlines outside the bundle mask / bundle mask voxels",
        "bundles": per_bundle,
    }


def score_tractogram_file(tractogram_path, bundles_dir, dilate_endpoints: int = 1):
    """Load a .trk/.tck/.trx tractogram on the ground truth's grid and score it."""
    from dipy.io.stateful_tractogram import Origin, Space

    tractogram_path = Path(tractogram_path)
    if not tractogram_path.exists():
        raise TrackflowError(f"tractogram {tractogram_path} does not exist")
    bundles, reference = load_ground_truth(bundles_dir, dilate_endpoints)
    sft = load_tractogram_file(tractogram_path, reference)
    sft.to_vox()
    sft.to_origin(Origin.TRACKVIS)
    assert sft.space == Space.VOX
    metrics = score_streamlines(list(sft.streamlines), bundles)
    metrics["tractogram"] = str(tractogram_path)
    return metrics
