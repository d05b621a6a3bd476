"""Tiny dwi_ml_ready folders for the hdf5 tests (a few voxels, a few streamlines per subject)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Origin, Space, StatefulTractogram
from dipy.io.streamline import save_tractogram

SHAPE = (8, 9, 7)
# Anisotropic, translated and axis-flipped so that vox <-> RASMM conversions are really exercised.
AFFINE = np.array([[-2.0, 0.0, 0.0, 30.0],
                   [0.0, 1.5, 0.0, -12.0],
                   [0.0, 0.0, 2.5, 4.0],
                   [0.0, 0.0, 0.0, 1.0]])
FODF_FEATURES = 3

# The §1.3 example as dwi_ml's documentation shows it: a trailing comma after the last group.
DOC_CONFIG_TEXT = """{
    "input": {"type": "volume",
              "files": ["anat/*__T1w.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"],
              "standardization": "per_file",
              "std_mask": ["masks/*__brain_mask.nii.gz"]},
    "wm_mask": {"type": "volume", "files": ["masks/*__mask_wm.nii.gz"],
                "standardization": "none"},
    "streamlines": {"type": "streamlines", "files": ["tractograms/*.trk"],
                    "dps_keys": ["k1"]},
}
"""


def random_streamlines(rng, n, shape=SHAPE, min_points=3, max_points=12):
    """Random walks strictly inside a volume, vox/corner coordinates, float32 [T_i, 3] arrays."""
    lines = []
    for _ in range(n):
        n_points = rng.integers(min_points, max_points + 1)
        start = rng.uniform(2.0, np.array(shape) - 2.0)
        steps = rng.normal(scale=0.3, size=(n_points - 1, 3))
        line = np.vstack([start, start + np.cumsum(steps, axis=0)])
        lines.append(np.clip(line, 0.05, np.array(shape) - 0.05).astype(np.float32))
    return lines


def save_nifti(path: Path, data, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    nib.save(img, path)


def save_streamlines(path: Path, lines, reference: Path, dps=None, bbox_valid_check=True) -> None:
    """Save vox/corner streamlines as .trk/.tck (``bbox_valid_check=False`` for invalid ones)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sft = StatefulTractogram(lines, str(reference), Space.VOX, origin=Origin.TRACKVIS,
                             data_per_streamline=dps or {})
    save_tractogram(sft, str(path), bbox_valid_check=bbox_valid_check)


def write_subject(root: Path, subject: str, seed: int, n_streamlines=(5, 4)) -> None:
    """One subject: T1 (3D), FA (3D), fODF (4D), brain and WM masks, two .trk bundles.

    The AF bundle has dps ``k1`` [B, 1] and ``k2`` [B, 2]; CC has ``k1`` only.
    """
    rng = np.random.default_rng(seed)
    d = root / subject
    brain = np.zeros(SHAPE)
    brain[1:-1, 1:-1, 1:-1] = 1
    wm = np.zeros(SHAPE)
    wm[2:-2, 2:-2, 2:-2] = 1
    t1 = rng.uniform(100, 900, SHAPE) * brain  # zero background, as a skull-stripped T1
    fa = rng.uniform(0.05, 0.9, SHAPE)
    fodf = rng.normal(1.0, 2.0, SHAPE + (FODF_FEATURES,))
    save_nifti(d / "anat" / f"{subject}__T1w.nii.gz", t1)
    save_nifti(d / "dwi" / f"{subject}__fa.nii.gz", fa)
    save_nifti(d / "dwi" / f"{subject}__fodf.nii.gz", fodf)
    save_nifti(d / "masks" / f"{subject}__brain_mask.nii.gz", brain)
    save_nifti(d / "masks" / f"{subject}__mask_wm.nii.gz", wm)
    ref = d / "anat" / f"{subject}__T1w.nii.gz"
    n_af, n_cc = n_streamlines
    save_streamlines(d / "tractograms" / f"{subject}__AF.trk", random_streamlines(rng, n_af), ref,
                     {"k1": rng.normal(size=(n_af, 1)), "k2": rng.normal(size=(n_af, 2))})
    save_streamlines(d / "tractograms" / f"{subject}__CC.trk", random_streamlines(rng, n_cc), ref,
                     {"k1": rng.normal(size=(n_cc, 1))})


def write_cohort(root: Path, training=("s1", "s2"), validation=("s3",), testing=()) -> dict:
    """A dwi_ml_ready folder, the documented config and the subject lists.

    Returns
    -------
    dict
        ``folder``, ``config``, ``training``, ``validation``, ``testing`` (paths), ready to be
        passed in that order (plus an output path) to ``dwiml_create_hdf5_dataset``.
    """
    root = Path(root)
    folder = root / "dwi_ml_ready"
    for seed, subject in enumerate((*training, *validation, *testing)):
        write_subject(folder, subject, seed)
    config = root / "config.json"
    config.write_text(DOC_CONFIG_TEXT)
    paths = {"folder": folder, "config": config}
    for name, subjects in (("training", training), ("validation", validation),
                           ("testing", testing)):
        paths[name] = root / f"{name}_subjs.txt"
        paths[name].write_text("\n".join(subjects))
    return paths


def write_config(path: Path, groups: dict) -> Path:
    path.write_text(json.dumps(groups, indent=1))
    return path


def cli_args(paths: dict, out, config=None) -> list[str]:
    """Positional arguments of ``dwiml_create_hdf5_dataset`` for a cohort from ``write_cohort``."""
    return [str(paths["folder"]), str(out), str(config or paths["config"]),
            str(paths["training"]), str(paths["validation"]), str(paths["testing"])]
