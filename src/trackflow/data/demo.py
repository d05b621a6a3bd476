"""Synthetic demo cohort: a small multi-bundle phantom with simulated diffusion, fODFs and ground truth.

Each subject is a 5-bundle phantom in one slab (tilted by SLAB_TILT_DEG about x), holding the hard
cases of tractography:

- ``horizontal`` x ``vertical``: a crossing near 90 degrees;
- ``horizontal`` x ``diagonal``: a crossing near 45 degrees;
- ``arc``: a U-shaped (half-circle) bundle;
- ``fan``: a bundle whose cross-section widens from head to tail (fanning).

Every bundle is a tube around a centreline. A dense set of streamlines sampled in the tube defines the
bundle's voxel mask, its per-voxel fibre orientation and its endpoint regions; the ground-truth
tractogram is a subset of that dense set, so its points lie in the masks by construction. The DWI is
simulated from the per-voxel orientations with the multi-tensor model (Rician noise), FA comes from a
dipy tensor fit and the fODF from dipy's CSD, converted to scilpy's non-legacy ``descoteaux07`` basis.
Subjects differ by a jitter of the bundle geometry, a small rotation and the noise.

Files of a subject ``<s>`` (paths relative to ``dwi_ml_ready/<s>/``; masks are uint8 0/1):
``anat/<s>__T1w.nii.gz``, ``dwi/<s>__fa.nii.gz``, ``dwi/<s>__fodf.nii.gz`` (SH_ORDER, SH_BASIS; FA and
fODF are zero outside the brain mask), ``masks/<s>__brain_mask.nii.gz``, ``masks/<s>__mask_wm.nii.gz``
(bundles dilated by one voxel: the tracking mask), ``other_masks/<s>__interface.nii.gz`` (bundle voxels
touching non-bundle voxels at the bundle ends: the seeding region), ``tractograms/<s>__<bundle>.trk``
(ground truth) and, for scoring, ``bundles/<s>__<bundle>__{head,tail,mask}.nii.gz``.

Geometry is computed in vox/corner coordinates (voxel i spans [i, i+1)); the tractograms are saved
in RASMM through dipy's ``StatefulTractogram``.
"""

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.data import get_sphere
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram
from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel
from dipy.reconst.dti import TensorModel
from dipy.reconst.shm import sh_to_sf_matrix
from scipy import ndimage
from scipy.spatial.transform import Rotation

from trackflow.data.hdf5.reader import SUBSET_NAMES
from trackflow.errors import TrackflowError
from trackflow.files import atomic_directory, check_outputs

LOGGER = logging.getLogger(__name__)

# Acquisition and reconstruction, written in README.txt; consumers of the fODF need SH_BASIS.
SH_BASIS = "descoteaux07"  # scilpy 2.x name of the NON-legacy basis (dipy: legacy=False)
SH_ORDER = 6
B_VALUE = 1000.0
N_DIRECTIONS = 32
N_B0 = 2
SNR = 20.0
VOXEL_SIZE_MM = 1.5
DEFAULT_SHAPE = (48, 48, 32)
TINY_SHAPE = (24, 24, 16)  # a cohort in about a second, for other modules' unit tests
DEFAULT_STREAMLINES_PER_BUNDLE = 300

# Tissue model (mm^2/s). The single-fibre tensor is also the CSD response, as if perfectly estimated.
FIBRE_EVALS = np.array([1.7e-3, 0.3e-3, 0.3e-3])
GM_DIFFUSIVITY = 0.8e-3
CSF_DIFFUSIVITY = 3.0e-3
S0 = 100.0
T1_INTENSITY = {"wm": 1.0, "gm": 0.65, "csf": 0.25}
T1_NOISE = 0.02
T1_SMOOTHING_VOXELS = 0.6  # Gaussian sigma: soft tissue boundaries, as partial volume would give
GM_RIBBON_VOXELS = 3  # on the default 48-voxel grid, scaled with the shape
END_REGION_VOXELS = 1.5  # arc length from each end that forms a bundle's head / tail region
CENTRELINE_STEP_VOXELS = 0.25  # dense sampling step: several points per voxel per streamline
GT_SUBSAMPLING = 2  # ground-truth streamlines keep every 2nd dense point (0.5 voxel = 0.75 mm steps)
DENSE_STREAMLINES_PER_BUNDLE = 1000
GEOMETRY_JITTER = 0.5  # std of control-point jitter, layout units
# The slab is tilted about x so that fibres leave the axial plane: in-plane fibres have no odd-m SH
# terms, which is where the legacy and non-legacy descoteaux07 bases differ, so a basis mix-up would
# go unnoticed on an axial phantom.
SLAB_TILT_DEG = 15.0
MAX_ROTATION_DEG = (3.0, 3.0, 5.0)  # per-subject random rotation about x, y, z, on top of the tilt

# Varied-geometry cohorts (make_demo_cohort(poses=...)): every subject has its own geometry, drawn from its
# seed. Sizes in mm hold on the default grid and scale with the layout on other shapes.
VARIED_PLACEMENT_MM = 2.0  # largest move of a bundle's control points (ends, arc centre)
VARIED_RADIUS = 0.15  # tube radii scaled by 1 +- this
VARIED_TURN_DEG = 5.0  # straight bundles turn about their middle (crossing angles), arc ends by up to this
VARIED_BEND = 0.08  # largest sagitta of a straight bundle's bend, as a fraction of its length
VARIED_ARC_CURVATURE = 0.15  # arc radius scaled by 1 +- this
VARIED_SHIFT_MM = 2.0  # whole-configuration shift, in-plane (half of it across the slab)
VARIED_DEFORMATION_MM = 1.5  # largest amplitude of the smooth deformation
VARIED_DEFORMATION_WAVELENGTH = 0.75  # of the in-plane volume size
VARIED_LAYOUT_MARGIN = 1.2  # the layout is drawn this much smaller, so that rotated subjects fit

# The layout is drawn on a 48-voxel grid (layout units) and scaled to the requested shape.
_LAYOUT_SIDE = 48.0

HDF5_CONFIG = {
    "input": {"type": "volume",
              "files": ["anat/*__T1w.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"],
              "standardization": "per_file", "std_mask": ["masks/*__brain_mask.nii.gz"]},
    "wm_mask": {"type": "volume", "files": ["masks/*__mask_wm.nii.gz"], "standardization": "none"},
    "interface_mask": {"type": "volume", "files": ["other_masks/*__interface.nii.gz"],
                       "standardization": "none"},
    "streamlines": {"type": "streamlines", "files": ["tractograms/*.trk"]},
}


@dataclass(frozen=True)
class BundleLayout:
    """One bundle of the phantom, in layout units (in-plane x, y of a 48-voxel grid).

    A straight bundle runs from ``start`` to ``end``; an arc (``arc_radius`` set) follows the circle
    of centre ``start`` from ``arc_angles_deg[0]`` to ``arc_angles_deg[1]``. The tube radius goes
    linearly from ``radius[0]`` (head) to ``radius[1]`` (tail).
    """

    name: str
    start: tuple[float, float]
    end: tuple[float, float] | None = None
    radius: tuple[float, float] = (2.5, 2.5)
    arc_radius: float | None = None
    arc_angles_deg: tuple[float, float] = (0.0, 0.0)


BUNDLES = (
    BundleLayout("horizontal", (6.0, 14.0), (42.0, 14.0)),
    BundleLayout("vertical", (12.0, 6.0), (12.0, 30.0)),  # crosses horizontal at 90 degrees
    BundleLayout("diagonal", (23.0, 6.0), (40.0, 23.0)),  # crosses horizontal at 45 degrees
    BundleLayout("arc", (34.0, 34.0), arc_radius=8.0, arc_angles_deg=(180.0, 0.0)),  # U shape
    BundleLayout("fan", (6.0, 39.0), (19.0, 39.0), radius=(1.2, 3.5)),
)


@dataclass
class BundleSample:
    """A bundle drawn for one subject, vox/corner coordinates.

    Attributes
    ----------
    streamlines : ndarray, shape (B, T, 3)
        Dense streamlines, all with the same number of points, head first.
    head_points : ndarray, bool, shape (T,)
        Points within END_REGION_VOXELS of arc length from the head (``tail_points`` likewise).
    """

    name: str
    streamlines: np.ndarray
    head_points: np.ndarray
    tail_points: np.ndarray


def demo_gradient_table():
    """The cohort's acquisition: N_B0 b0s then N_DIRECTIONS directions at B_VALUE, same for every seed."""
    rng = np.random.default_rng(1234)
    hemisphere = HemiSphere(theta=np.arccos(rng.uniform(-1, 1, N_DIRECTIONS)),
                            phi=rng.uniform(0, 2 * np.pi, N_DIRECTIONS))
    hemisphere, _ = disperse_charges(hemisphere, 1000)
    bvecs = np.vstack([np.zeros((N_B0, 3)), hemisphere.vertices])
    bvals = np.r_[np.zeros(N_B0), np.full(N_DIRECTIONS, B_VALUE)]
    return gradient_table(bvals, bvecs=bvecs)


def legacy_to_descoteaux07(sh_coeffs: np.ndarray, sh_order: int) -> np.ndarray:
    """Convert SH coefficients from dipy's legacy ``descoteaux07`` basis to the non-legacy one.

    Both bases span the same space, so the least-squares fit on a dense sphere is exact.

    Parameters
    ----------
    sh_coeffs : ndarray, shape (..., C)
        C = (sh_order + 1)(sh_order + 2) / 2 coefficients in the legacy basis (what dipy's CSD returns).
    """
    sphere = get_sphere(name="repulsion724")
    with warnings.catch_warnings():
        # dipy warns that the legacy basis is outdated: reading it is the point here.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        legacy_to_sf, _ = sh_to_sf_matrix(sphere, sh_order_max=sh_order, basis_type="descoteaux07",
                                          legacy=True, return_inv=True)
    _, sf_to_new = sh_to_sf_matrix(sphere, sh_order_max=sh_order, basis_type="descoteaux07",
                                   legacy=False, return_inv=True)
    return sh_coeffs @ (legacy_to_sf @ sf_to_new)


def _demo_affine(shape) -> np.ndarray:
    """Voxel-to-RASMM affine: isotropic VOXEL_SIZE_MM, origin at the volume centre."""
    affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
    affine[:3, 3] = -VOXEL_SIZE_MM * (np.asarray(shape) - 1) / 2
    return affine


def _centreline(layout: BundleLayout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Jittered centreline of one bundle in layout units: points [K, 2] and tube radii [K]."""
    start = np.asarray(layout.start) + rng.normal(0, GEOMETRY_JITTER, 2)
    radius_scale = rng.uniform(0.9, 1.1)
    if layout.arc_radius is None:
        end = np.asarray(layout.end) + rng.normal(0, GEOMETRY_JITTER, 2)
        length = np.linalg.norm(end - start)
        t = np.linspace(0, 1, int(np.ceil(length / CENTRELINE_STEP_VOXELS)) + 1)
        points = start + t[:, None] * (end - start)
    else:
        arc_radius = layout.arc_radius + rng.normal(0, GEOMETRY_JITTER)
        points, t = _arc_points(start, arc_radius, np.deg2rad(layout.arc_angles_deg))
    radii = radius_scale * (layout.radius[0] + t * (layout.radius[1] - layout.radius[0]))
    return points, radii


def _arc_points(centre: np.ndarray, arc_radius: float, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points [K, 2] of the circle arc from ``angles[0]`` to ``angles[1]`` (radians), and their t in [0, 1]."""
    length = arc_radius * abs(angles[1] - angles[0])
    t = np.linspace(0, 1, int(np.ceil(length / CENTRELINE_STEP_VOXELS)) + 1)
    angle = angles[0] + t * (angles[1] - angles[0])
    return centre + arc_radius * np.stack([np.cos(angle), np.sin(angle)], axis=1), t


def _in_disk(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A point drawn uniformly in the disk of ``radius`` around the origin [2]."""
    r, angle = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return np.array([r * np.cos(angle), r * np.sin(angle)])


def _rotation_2d(degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return np.array([[c, -s], [s, c]])


def _varied_centreline(layout: BundleLayout, rng: np.random.Generator,
                       placement: float) -> tuple[np.ndarray, np.ndarray]:
    """Centreline of a varied-geometry subject, layout units: points [K, 2] and tube radii [K].

    Control points move up to ``placement`` (layout units); a straight bundle also turns about its middle
    (its crossing angles change) and bends (a quadratic Bezier curve); an arc changes its radius
    (curvature) and its end angles.
    """
    turn_deg = rng.uniform(-1, 1) * VARIED_TURN_DEG
    radius_scale = rng.uniform(1 - VARIED_RADIUS, 1 + VARIED_RADIUS)
    if layout.arc_radius is None:
        start = np.asarray(layout.start) + _in_disk(rng, placement)
        end = np.asarray(layout.end) + _in_disk(rng, placement)
        middle = (start + end) / 2
        start, end = (middle + (point - middle) @ _rotation_2d(turn_deg).T for point in (start, end))
        chord = np.linalg.norm(end - start)
        normal = np.array([start[1] - end[1], end[0] - start[0]]) / chord
        # The Bezier control point lies at twice the sagitta from the chord's middle.
        control = middle + 2 * rng.uniform(-1, 1) * VARIED_BEND * chord * normal
        t = np.linspace(0, 1, int(np.ceil(1.1 * chord / CENTRELINE_STEP_VOXELS)) + 1)[:, None]
        points = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t ** 2 * end
        t = t[:, 0]
    else:
        centre = np.asarray(layout.start) + _in_disk(rng, placement)
        arc_radius = layout.arc_radius * rng.uniform(1 - VARIED_ARC_CURVATURE, 1 + VARIED_ARC_CURVATURE)
        angles = np.asarray(layout.arc_angles_deg) + turn_deg + rng.uniform(-1, 1, 2) * VARIED_TURN_DEG
        points, t = _arc_points(centre, arc_radius, np.deg2rad(angles))
    radii = radius_scale * (layout.radius[0] + t * (layout.radius[1] - layout.radius[0]))
    return points, radii


@dataclass(frozen=True)
class SubjectVariation:
    """How a varied-geometry subject departs from the layout, beyond its bundles' own changes.

    Attributes
    ----------
    pose_deg : float
        Rotation of the whole configuration in the slab's plane (the subject's pose, given by the user).
    rotation : ndarray, shape (3, 3)
        The pose, then a random tilt of up to MAX_ROTATION_DEG about x and y, then SLAB_TILT_DEG about x.
    shift : ndarray, shape (3,)
        Translation of the whole configuration, voxels.
    wave_vectors, phases : ndarrays, shapes (3, 3) and (3,)
        Smooth deformation: displacement along axis c = amplitude * sin(wave_vectors[c] . p + phases[c]).
    amplitude : float
        voxels; small against the wavelength, so the deformation is one-to-one.
    """

    pose_deg: float
    rotation: np.ndarray
    shift: np.ndarray
    wave_vectors: np.ndarray
    phases: np.ndarray
    amplitude: float

    def deform(self, points: np.ndarray) -> np.ndarray:
        """Deformed points [..., 3] (vox/corner)."""
        return points + self.amplitude * np.sin(points @ self.wave_vectors.T + self.phases)


def _draw_variation(pose_deg: float, shape, rng: np.random.Generator) -> SubjectVariation:
    mm = 1 / VOXEL_SIZE_MM * _layout_scale(shape, varied=True) / _layout_scale(DEFAULT_SHAPE, varied=True)
    tilt = Rotation.from_euler("xyz", [SLAB_TILT_DEG + rng.uniform(-1, 1) * MAX_ROTATION_DEG[0],
                                       rng.uniform(-1, 1) * MAX_ROTATION_DEG[1], 0.0], degrees=True)
    rotation = (tilt * Rotation.from_euler("z", pose_deg, degrees=True)).as_matrix()
    shift = np.r_[_in_disk(rng, VARIED_SHIFT_MM * mm), rng.uniform(-1, 1) * VARIED_SHIFT_MM * mm / 2]
    directions = rng.normal(size=(3, 3))
    wavelength = VARIED_DEFORMATION_WAVELENGTH * min(shape[:2])
    wave_vectors = 2 * np.pi / wavelength * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    return SubjectVariation(pose_deg=float(pose_deg), rotation=rotation, shift=shift,
                            wave_vectors=wave_vectors, phases=rng.uniform(0, 2 * np.pi, 3),
                            amplitude=rng.uniform(0.5, 1) * VARIED_DEFORMATION_MM * mm)


def _layout_scale(shape, varied: bool) -> float:
    """Voxels per layout unit; a varied cohort leaves a margin for its rotations, shifts and moves."""
    return min(shape[0], shape[1]) / (_LAYOUT_SIDE * (VARIED_LAYOUT_MARGIN if varied else 1.0))


def _draw_bundle(layout: BundleLayout, shape, rotation: np.ndarray, n_streamlines: int,
                 rng: np.random.Generator, variation: SubjectVariation | None = None) -> BundleSample:
    """Sample ``n_streamlines`` dense streamlines inside the bundle's tube, vox/corner coordinates.

    Each streamline keeps a fixed position (u, v) in the unit disk of the tube's cross-section, scaled
    by the local radius, so a widening tube gives a fan. With a ``variation`` (whose rotation replaces
    ``rotation``) the bundle is varied, shifted and deformed.
    """
    scale = _layout_scale(shape, varied=variation is not None)
    if variation is None:
        points_2d, radii = _centreline(layout, rng)
    else:
        rotation = variation.rotation
        # Sizes in mm are those of the default grid, scaled with the layout on other shapes.
        points_2d, radii = _varied_centreline(layout, rng, VARIED_PLACEMENT_MM / VOXEL_SIZE_MM
                                              / _layout_scale(DEFAULT_SHAPE, varied=True))
    volume_centre = np.asarray(shape, dtype=float) / 2
    in_plane_offset = (np.asarray(shape[:2]) - scale * _LAYOUT_SIDE) / 2
    centre_2d = in_plane_offset + scale * points_2d
    centre = np.column_stack([centre_2d, np.full(len(points_2d), volume_centre[2])])  # [K, 3]
    centre = volume_centre + (centre - volume_centre) @ rotation.T
    radii = scale * radii

    tangents = np.gradient(centre, axis=0)
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    # The phantom is planar, so the plane normal is never parallel to a tangent.
    normal_1 = np.cross(tangents, rotation[:, 2])
    normal_1 /= np.linalg.norm(normal_1, axis=1, keepdims=True)
    normal_2 = np.cross(tangents, normal_1)

    disk_radius = np.sqrt(rng.uniform(0, 1, n_streamlines))  # uniform density over the disk
    disk_angle = rng.uniform(0, 2 * np.pi, n_streamlines)
    u = disk_radius * np.cos(disk_angle)
    v = disk_radius * np.sin(disk_angle)
    offsets = radii[None, :, None] * (u[:, None, None] * normal_1[None] + v[:, None, None] * normal_2[None])
    streamlines = centre[None] + offsets  # [B, K, 3]
    if variation is not None:
        centre = variation.deform(centre + variation.shift)
        streamlines = variation.deform(streamlines + variation.shift)

    arc_length = np.r_[0, np.cumsum(np.linalg.norm(np.diff(centre, axis=0), axis=1))]
    return BundleSample(name=layout.name, streamlines=streamlines,
                        head_points=arc_length < END_REGION_VOXELS,
                        tail_points=arc_length > arc_length[-1] - END_REGION_VOXELS)


def _voxel_mask(points: np.ndarray, shape) -> np.ndarray:
    """Boolean volume of the voxels holding at least one of ``points`` [N, 3] (vox/corner)."""
    mask = np.zeros(shape, dtype=bool)
    index = np.floor(points).astype(int)
    mask[index[:, 0], index[:, 1], index[:, 2]] = True
    return mask


def _voxel_orientations(streamlines: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel segment count and main orientation of one bundle.

    Parameters
    ----------
    streamlines : ndarray, shape (B, T, 3)
        vox/corner coordinates.

    Returns
    -------
    counts : ndarray, shape (X*Y*Z,)
        Number of segments per voxel (flat C-order index).
    directions : ndarray, shape (X*Y*Z, 3)
        Principal eigenvector of the summed segment dyadics t t^T (zero where counts is 0).
    """
    segments = np.diff(streamlines, axis=1).reshape(-1, 3)
    segments /= np.linalg.norm(segments, axis=1, keepdims=True)
    midpoints = (0.5 * (streamlines[:, 1:] + streamlines[:, :-1])).reshape(-1, 3)
    flat = np.ravel_multi_index(np.floor(midpoints).astype(int).T, shape)
    n_voxels = int(np.prod(shape))
    dyadics = np.zeros((n_voxels, 3, 3))
    for i in range(3):
        for j in range(i, 3):
            dyadics[:, i, j] = np.bincount(flat, segments[:, i] * segments[:, j], minlength=n_voxels)
            dyadics[:, j, i] = dyadics[:, i, j]
    counts = np.bincount(flat, minlength=n_voxels)
    directions = np.zeros((n_voxels, 3))
    occupied = counts > 0
    directions[occupied] = np.linalg.eigh(dyadics[occupied])[1][:, :, -1]
    return counts, directions


def multi_tensor_signal(gtab, fractions: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Noise-free multi-tensor signal (S0 = 1) of cylindrical FIBRE_EVALS tensors, as dipy's ``multi_tensor``.

    Parameters
    ----------
    gtab : dipy GradientTable with G volumes.
    fractions : ndarray, shape (V, N)
        Volume fraction of each of N fibre populations in V voxels (rows sum to 1).
    directions : ndarray, shape (V, N, 3)
        Unit direction of each population.

    Returns
    -------
    ndarray, shape (V, G)
    """
    # Cylindrical tensor: g^T D g = l2 + (l1 - l2) (g . e)^2
    cos2 = np.einsum("vnk,gk->vng", directions, gtab.bvecs) ** 2
    adc = FIBRE_EVALS[1] + (FIBRE_EVALS[0] - FIBRE_EVALS[1]) * cos2
    return np.einsum("vn,vng->vg", fractions, np.exp(-gtab.bvals * adc))


def _simulate_dwi(gtab, white_matter, fractions, directions, gm, csf, rng) -> np.ndarray:
    """DWI volume with Rician noise at SNR (on the b0).

    Parameters
    ----------
    white_matter, gm, csf : ndarray, bool, shape (X, Y, Z)
        Tissue classes (disjoint, covering the volume); GM and CSF are isotropic (GM_DIFFUSIVITY,
        CSF_DIFFUSIVITY).
    fractions, directions : ndarray, shapes (V, N) and (V, N, 3)
        Fibre populations of the V white-matter voxels (see ``multi_tensor_signal``).

    Returns
    -------
    ndarray, shape (X, Y, Z, G)
    """
    signal = np.zeros((*white_matter.shape, len(gtab.bvals)))
    signal[white_matter] = multi_tensor_signal(gtab, fractions, directions)
    signal[gm] = np.exp(-gtab.bvals * GM_DIFFUSIVITY)
    signal[csf] = np.exp(-gtab.bvals * CSF_DIFFUSIVITY)
    signal *= S0
    sigma = S0 / SNR
    return np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))


def _subject_rotation(rng: np.random.Generator) -> np.ndarray:
    angles = rng.uniform(-1, 1, 3) * np.asarray(MAX_ROTATION_DEG) + [SLAB_TILT_DEG, 0.0, 0.0]
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix()


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def make_demo_subject(subject_dir: Path, subject_id: str, shape, streamlines_per_bundle: int,
                      rng: np.random.Generator, gtab, csd_model, pose_deg: float | None = None) -> None:
    """Write one subject's files (layout of the module docstring) into ``subject_dir``; with a
    ``pose_deg`` the subject has its own geometry (``SubjectVariation``), rotated in-plane by it."""
    affine = _demo_affine(shape)
    n_dense = max(DENSE_STREAMLINES_PER_BUNDLE, streamlines_per_bundle)
    if pose_deg is None:
        rotation, variation = _subject_rotation(rng), None
    else:
        variation = _draw_variation(pose_deg, shape, rng)
        rotation = variation.rotation
    bundles = [_draw_bundle(layout, shape, rotation, n_dense, rng, variation) for layout in BUNDLES]
    for bundle in bundles:
        if (bundle.streamlines < 0).any() or (bundle.streamlines >= shape).any():
            raise TrackflowError(f"the demo phantom does not fit in a {shape} volume: make it thicker")

    n_voxels = int(np.prod(shape))
    counts = np.zeros((n_voxels, len(bundles)))
    directions = np.zeros((n_voxels, len(bundles), 3))
    for b, bundle in enumerate(bundles):
        counts[:, b], directions[:, b] = _voxel_orientations(bundle.streamlines, shape)
    bundle_masks = (counts > 0).T.reshape(len(bundles), *shape)
    white_matter = bundle_masks.any(axis=0)
    fractions = np.divide(counts, counts.sum(axis=1, keepdims=True), out=np.zeros_like(counts),
                          where=counts > 0)

    ribbon_voxels = max(1, int(GM_RIBBON_VOXELS * min(shape[:2]) / _LAYOUT_SIDE))
    brain = ndimage.binary_dilation(white_matter, ndimage.generate_binary_structure(3, 2),
                                    iterations=ribbon_voxels)
    gm = brain & ~white_matter
    csf = ~brain
    # Tracking mask: slightly larger than the bundles so that tracking in it is meaningful at edges.
    wm_mask = ndimage.binary_dilation(white_matter)
    end_regions = np.zeros(shape, dtype=bool)
    for bundle in bundles:
        end_regions |= _voxel_mask(bundle.streamlines[:, bundle.head_points].reshape(-1, 3), shape)
        end_regions |= _voxel_mask(bundle.streamlines[:, bundle.tail_points].reshape(-1, 3), shape)
    wm_boundary = white_matter & ~ndimage.binary_erosion(white_matter)
    interface = wm_boundary & end_regions

    in_wm = white_matter.ravel()
    dwi = _simulate_dwi(gtab, white_matter, fractions[in_wm], directions[in_wm], gm, csf, rng)
    fa = np.nan_to_num(TensorModel(gtab).fit(dwi, mask=brain).fa)
    fodf = np.zeros((*shape, (SH_ORDER + 1) * (SH_ORDER + 2) // 2))
    fodf[brain] = legacy_to_descoteaux07(csd_model.fit(dwi[brain]).shm_coeff, SH_ORDER)

    tissue = (T1_INTENSITY["wm"] * white_matter + T1_INTENSITY["gm"] * gm + T1_INTENSITY["csf"] * csf)
    t1 = ndimage.gaussian_filter(tissue, sigma=T1_SMOOTHING_VOXELS) + rng.normal(0, T1_NOISE, shape)

    s = subject_id
    _save_nifti(t1.astype(np.float32), affine, subject_dir / "anat" / f"{s}__T1w.nii.gz")
    _save_nifti(fa.astype(np.float32), affine, subject_dir / "dwi" / f"{s}__fa.nii.gz")
    _save_nifti(fodf.astype(np.float32), affine, subject_dir / "dwi" / f"{s}__fodf.nii.gz")
    _save_nifti(brain.astype(np.uint8), affine, subject_dir / "masks" / f"{s}__brain_mask.nii.gz")
    _save_nifti(wm_mask.astype(np.uint8), affine, subject_dir / "masks" / f"{s}__mask_wm.nii.gz")
    _save_nifti(interface.astype(np.uint8), affine, subject_dir / "other_masks" / f"{s}__interface.nii.gz")

    reference = nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), affine)
    (subject_dir / "tractograms").mkdir()
    for bundle, bundle_mask in zip(bundles, bundle_masks):
        # Endpoint masks one voxel larger than the end regions: tracked streamlines stop just past them.
        for end, points in (("head", bundle.head_points), ("tail", bundle.tail_points)):
            end_mask = ndimage.binary_dilation(
                _voxel_mask(bundle.streamlines[:, points].reshape(-1, 3), shape)) & brain
            _save_nifti(end_mask.astype(np.uint8), affine,
                        subject_dir / "bundles" / f"{s}__{bundle.name}__{end}.nii.gz")
        _save_nifti(bundle_mask.astype(np.uint8), affine,
                    subject_dir / "bundles" / f"{s}__{bundle.name}__mask.nii.gz")

        # Ground truth: a subset of the dense streamlines, subsampled but always keeping the last point.
        kept_points = np.r_[np.arange(0, bundle.streamlines.shape[1] - 1, GT_SUBSAMPLING),
                            bundle.streamlines.shape[1] - 1]
        ground_truth = bundle.streamlines[:streamlines_per_bundle][:, kept_points].astype(np.float32)
        sft = StatefulTractogram(list(ground_truth), reference, Space.VOX, origin=Origin.TRACKVIS)
        sft.to_rasmm()
        save_tractogram(sft, str(subject_dir / "tractograms" / f"{s}__{bundle.name}.trk"),
                        bbox_valid_check=True)


def split_subjects(subject_ids: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Training / validation / testing lists: about 20% each for validation and testing, at least one
    of each from 3 subjects on (4 subjects: 2 / 1 / 1); with fewer, training then validation first."""
    n = len(subject_ids)
    n_held_out = max(1, round(0.2 * n)) if n >= 3 else 0
    n_validation = n_held_out if n >= 3 else n - 1
    n_training = n - n_validation - n_held_out
    return (subject_ids[:n_training], subject_ids[n_training:n_training + n_validation],
            subject_ids[n_training + n_validation:])


def _readme_text(subject_ids, shape, seed, streamlines_per_bundle) -> str:
    bundle_lines = "\n".join(f"  - {layout.name}" for layout in BUNDLES)
    n_subjects = len(subject_ids)
    return f"""trackflow synthetic demo cohort (trackflow_make_demo), seed {seed}, {n_subjects} subjects.

Geometry: {shape[0]}x{shape[1]}x{shape[2]} voxels, {VOXEL_SIZE_MM} mm isotropic, RAS axes, origin at the
volume centre. Five bundles in one slab tilted by {SLAB_TILT_DEG:g} degrees about x (jittered and rotated by a
few more degrees per subject):
{bundle_lines}
horizontal x vertical cross at ~90 degrees, horizontal x diagonal at ~45 degrees, arc is U-shaped, fan widens.

Diffusion: {N_B0} b0 + {N_DIRECTIONS} directions at b={B_VALUE:g} s/mm^2, multi-tensor model
(fibre eigenvalues {FIBRE_EVALS.tolist()} mm^2/s; GM isotropic {GM_DIFFUSIVITY}, CSF isotropic {CSF_DIFFUSIVITY}),
Rician noise at SNR {SNR:g} on the b0.
FA: dipy TensorModel. fODF: dipy CSD (response = the simulated fibre tensor), SH order {SH_ORDER},
basis {SH_BASIS} (scilpy 2.x name: the NON-legacy basis; dipy legacy=False). Pass --sh_basis {SH_BASIS}.
FA and fODF are zero outside the brain mask.
T1w: intensities {T1_INTENSITY}, Gaussian smoothing (sigma {T1_SMOOTHING_VOXELS} voxel),
noise std {T1_NOISE}.

Per subject (dwi_ml_ready/<subject>/): anat/<s>__T1w, dwi/<s>__fa, dwi/<s>__fodf, masks/<s>__brain_mask,
masks/<s>__mask_wm (bundles dilated by one voxel), other_masks/<s>__interface (WM voxels touching GM at
bundle ends: the seeding region), tractograms/<s>__<bundle>.trk ({streamlines_per_bundle} ground-truth
streamlines per bundle, RASMM), bundles/<s>__<bundle>__{{head,tail,mask}}.nii.gz (scoring masks).
config/: hdf5_config.json and training/validation/testing subject lists.
"""


_VARIED_README = f"""
Varied geometry: every subject has its own geometry, drawn from its seed: bundle ends and the arc's centre
moved by up to {VARIED_PLACEMENT_MM:g} mm, straight bundles turned about their middle by up to {VARIED_TURN_DEG:g}
degrees (crossing angles) and bent (sagitta up to {100 * VARIED_BEND:g}% of their length), arc radius (curvature) and
tube radii scaled by up to +-{100 * VARIED_ARC_CURVATURE:g}% / +-{100 * VARIED_RADIUS:g}%, the whole configuration rotated in
the slab's plane by the subject's pose, tilted by up to {MAX_ROTATION_DEG[0]:g} degrees more, shifted by up to
{VARIED_SHIFT_MM:g} mm and smoothly deformed (sine displacement up to {VARIED_DEFORMATION_MM:g} mm). The layout is drawn
{VARIED_LAYOUT_MARGIN:g} times smaller than in the classic demo so that rotated subjects fit.
config/poses.tsv: subject, subset and pose (degrees) of every subject.
"""


def _subject_subsets(n_subjects: int | None, poses: dict | None) -> dict:
    """Poses by subset (None poses for the classic demo), checking ``poses``."""
    if poses is None:
        return {"all": [None] * (4 if n_subjects is None else n_subjects)}
    if n_subjects is not None:
        raise TrackflowError("give the number of subjects or the poses of a varied cohort, not both")
    if sorted(poses) != sorted(SUBSET_NAMES) or not all(len(poses[k]) for k in SUBSET_NAMES):
        raise TrackflowError(f"poses need at least one angle for each of {', '.join(SUBSET_NAMES)}, "
                             f"got {poses}")
    if not all(np.isfinite(float(pose)) for pose in sum((list(v) for v in poses.values()), [])):
        raise TrackflowError(f"poses must be finite angles in degrees, got {poses}")
    return {k: [float(pose) for pose in poses[k]] for k in SUBSET_NAMES}


def _split_by_poses(subject_ids: list[str], subsets: dict) -> list[list[str]]:
    """The subject lists of a varied cohort: consecutive ids, in the order of ``SUBSET_NAMES``."""
    ends = np.cumsum([len(subsets[k]) for k in SUBSET_NAMES])
    return [subject_ids[start:end] for start, end in zip(np.r_[0, ends[:-1]], ends)]


def _is_replaceable_cohort(path: Path) -> bool:
    """An empty folder or one written by ``make_demo_cohort``: safe to delete under ``-f``."""
    return path.is_dir() and (not any(path.iterdir()) or
                              ((path / "README.txt").is_file() and (path / "dwi_ml_ready").is_dir()))


def make_demo_cohort(out_dir, n_subjects: int | None = None, seed: int = 0,
                     streamlines_per_bundle: int = DEFAULT_STREAMLINES_PER_BUNDLE,
                     shape=DEFAULT_SHAPE, force: bool = False,
                     poses: dict[str, list[float]] | None = None) -> Path:
    """Write a complete synthetic cohort, deterministic for a given seed.

    Layout: ``out_dir/dwi_ml_ready/<subject>/...`` (see the module docstring), ``out_dir/config/
    hdf5_config.json``, ``out_dir/config/{training,validation,testing}_subjs.txt`` and
    ``out_dir/README.txt``. Everything is written in a temporary folder beside ``out_dir`` and renamed
    at the end, so an interrupted run leaves no partial cohort.

    Parameters
    ----------
    out_dir : path
        Folder to create; must not exist unless ``force``.
    n_subjects : int or None
        Number of subjects, ids ``sub-01``, ``sub-02``, ... [4; with ``poses``, the number of poses].
    seed : int
        Same seed, same arrays.
    streamlines_per_bundle : int
        Ground-truth streamlines written per bundle.
    shape : tuple of 3 ints
        Volume shape in voxels; the layout is scaled to the in-plane size. ``TINY_SHAPE`` with a few
        streamlines per bundle gives a cohort for unit tests in about a second per subject.
    force : bool
        Replace an existing ``out_dir``, provided it is empty or a previous demo cohort (a folder with
        README.txt and dwi_ml_ready/): ``-f`` on a folder holding other results is refused.
    poses : dict or None
        A varied-geometry cohort: ``{"training": [deg, ...], "validation": [...], "testing": [...]}``,
        one subject per angle (in that order: training subjects first), each with its own geometry
        (``SubjectVariation``: bundles moved, turned, bent and resized, the whole configuration shifted
        and smoothly deformed) rotated in the slab's plane by its angle. The subject lists follow the
        keys; ``config/poses.tsv`` lists subject, subset and pose. None: the classic demo, whose subjects
        share one geometry up to a small jitter.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    shape = tuple(int(n) for n in shape)
    subsets = _subject_subsets(n_subjects, poses)
    n_subjects = sum(len(subset) for subset in subsets.values())
    if n_subjects < 1:
        raise TrackflowError(f"the number of subjects must be at least 1, got {n_subjects}")
    if streamlines_per_bundle < 1:
        raise TrackflowError(f"streamlines per bundle must be at least 1, got {streamlines_per_bundle}")
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 8:
        raise TrackflowError(f"the demo shape must be 3 sizes, at least 16x16x8 voxels, got {shape}")
    check_outputs([out_dir], force, directories=True)
    if out_dir.exists() and not _is_replaceable_cohort(out_dir):
        raise TrackflowError(f"refusing to overwrite {out_dir}: it is neither empty nor a demo cohort")

    started = time.perf_counter()
    subject_ids = [f"sub-{i + 1:0{max(2, len(str(n_subjects)))}d}" for i in range(n_subjects)]
    subject_poses = [pose for subset in subsets.values() for pose in subset] if poses else [None] * n_subjects
    gtab = demo_gradient_table()
    csd_model = ConstrainedSphericalDeconvModel(gtab, (FIBRE_EVALS, S0), sh_order_max=SH_ORDER)
    subject_seeds = np.random.SeedSequence(seed).spawn(n_subjects)

    with atomic_directory(out_dir) as staging:
        for subject_id, subject_seed, pose in zip(subject_ids, subject_seeds, subject_poses):
            make_demo_subject(staging / "dwi_ml_ready" / subject_id, subject_id, shape,
                              streamlines_per_bundle, np.random.default_rng(subject_seed), gtab, csd_model,
                              pose)
            LOGGER.info("demo subject %s written (%.1f s so far)", subject_id, time.perf_counter() - started)
        config_dir = staging / "config"
        config_dir.mkdir()
        (config_dir / "hdf5_config.json").write_text(json.dumps(HDF5_CONFIG, indent=2) + "\n")
        splits = _split_by_poses(subject_ids, subsets) if poses else split_subjects(subject_ids)
        for split, ids in zip(SUBSET_NAMES, splits):
            (config_dir / f"{split}_subjs.txt").write_text("".join(f"{s}\n" for s in ids))
        readme = _readme_text(subject_ids, shape, seed, streamlines_per_bundle)
        if poses:
            (config_dir / "poses.tsv").write_text("subject\tsubset\tpose_deg\n" + "".join(
                f"{s}\t{subset}\t{pose:g}\n" for s, subset, pose in
                zip(subject_ids, (k for k, v in subsets.items() for _ in v), subject_poses)))
            readme += _VARIED_README
        (staging / "README.txt").write_text(readme)
    LOGGER.info("demo cohort of %d subjects written to %s in %.1f s", n_subjects, out_dir,
                time.perf_counter() - started)
    return out_dir
