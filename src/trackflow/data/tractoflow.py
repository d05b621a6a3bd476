"""A dwi_ml-ready cohort from TractoFlow results.

TractoFlow (scilus/tractoflow, layout of version 2.4.4) publishes every process's files as
``results/<S>/<Process>/<S>__<name>``, next to cohort-wide folders (``Mean_FRF``, ``Readme``, ``Read_BIDS``).
``prepare_tractoflow`` links the files a model needs into ``OUT/dwi_ml_ready/<S>/`` (symlinks, as dwi_ml's
documentation recommends), and writes the hdf5 group config and the three subject lists beside it.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np

from trackflow.errors import TrackflowError
from trackflow.files import atomic_directory, check_outputs

LOGGER = logging.getLogger(__name__)

# dwi_ml_ready/<S>/<name> <- results/<S>/<TractoFlow file>, ``{s}`` being the subject id.
REQUIRED_FILES = {
    "anat/{s}__t1.nii.gz": "Register_T1/{s}__t1_warped.nii.gz",  # the T1 registered onto the DWI grid
    "dwi/{s}__fa.nii.gz": "DTI_Metrics/{s}__fa.nii.gz",
    "dwi/{s}__fodf.nii.gz": "FODF_Metrics/{s}__fodf.nii.gz",
    "masks/{s}__mask_wm.nii.gz": "Segment_Tissues/{s}__mask_wm.nii.gz",
    "masks/{s}__interface.nii.gz": "PFT_Tracking_Maps/{s}__interface.nii.gz",
}
# PFT tractograms, one per seed: <S>__pft_tracking_<algo>_<seeding>_seed_<n>.trk (prob_wm_seed_0 by default).
TRACTOGRAM_PATTERN = "PFT_Tracking/{s}__pft_tracking_*.trk"
COHORT_FOLDERS = {"Mean_FRF", "Readme", "Read_BIDS", "work"}
SUBSETS = ("training", "validation", "testing")

GROUPS_CONFIG = {
    "input": {"type": "volume", "files": ["anat/*__t1.nii.gz", "dwi/*__fa.nii.gz", "dwi/*__fodf.nii.gz"],
              "standardization": "per_file"},
    "wm_mask": {"type": "volume", "files": ["masks/*__mask_wm.nii.gz"], "standardization": "none"},
    "interface_mask": {"type": "volume", "files": ["masks/*__interface.nii.gz"], "standardization": "none"},
}
STREAMLINES_GROUP = {"streamlines": {"type": "streamlines", "files": ["tractograms/*__pft_tracking_*.trk"]}}


def tractoflow_subjects(results) -> list[str]:
    """Subject ids of a TractoFlow results folder (its sub-folders, less the cohort-wide ones), sorted."""
    results = Path(results)
    if not results.is_dir():
        raise TrackflowError(f"TractoFlow results folder {results} does not exist")
    subjects = sorted(p.name for p in results.iterdir() if p.is_dir() and p.name not in COHORT_FOLDERS)
    if not subjects:
        raise TrackflowError(f"{results} holds no subject folder (results/<subject>/<Process>/...)")
    return subjects


def subject_files(results, subjects) -> dict:
    """{subject: {dwi_ml_ready name: TractoFlow file}} for every subject, tractograms included when every
    subject has one; raises one error listing, per subject, every required file that is missing."""
    results = Path(results)
    files, missing = {}, {}
    for s in subjects:
        folder = results / s
        files[s] = {name.format(s=s): folder / source.format(s=s) for name, source in REQUIRED_FILES.items()}
        absent = [str(path.relative_to(results)) for path in files[s].values() if not path.is_file()]
        if absent:
            missing[s] = absent
    if missing:
        raise TrackflowError("missing TractoFlow files: " + "; ".join(
            f"{s}: {', '.join(paths)}" for s, paths in missing.items()))
    tractograms = {s: sorted((results / s).glob(TRACTOGRAM_PATTERN.format(s=s))) for s in subjects}
    if all(tractograms.values()):
        for s in subjects:
            files[s].update({f"tractograms/{path.name}": path for path in tractograms[s]})
    elif any(tractograms.values()):
        raise TrackflowError("missing TractoFlow files: " + "; ".join(
            f"{s}: {TRACTOGRAM_PATTERN.format(s=s)}" for s in subjects if not tractograms[s])
            + " (other subjects have PFT tractograms)")
    return files


def split_subjects(subjects, ratios, seed: int) -> dict:
    """{subset: ids}: a seeded shuffle of ``subjects`` cut by ``ratios`` (training, validation, testing).

    Rounded sizes; with at least 3 subjects and positive ratios every subset gets at least one subject.
    """
    ratios = np.asarray(ratios, dtype=float)
    if ratios.shape != (3,) or not np.isfinite(ratios).all() or (ratios < 0).any() or not ratios[0] > 0:
        raise TrackflowError(f"split ratios must be 3 non-negative numbers (training, validation, testing), "
                             f"the training one positive; got {list(ratios)}")
    n = len(subjects)
    sizes = np.floor(ratios / ratios.sum() * n + 0.5).astype(int)
    if n >= 3:
        sizes = np.where((ratios > 0) & (sizes == 0), 1, sizes)
    sizes[0] = n - sizes[1:].sum()  # training takes the rounding rest
    if sizes[0] < 0 or (ratios[0] > 0 and sizes[0] == 0):
        raise TrackflowError(f"cannot split {n} subjects by {list(ratios)}: give the subject lists")
    order = np.random.default_rng(seed).permutation(sorted(subjects))
    cuts = np.cumsum(sizes)[:-1]
    return {subset: sorted(part.tolist()) for subset, part in zip(SUBSETS, np.split(order, cuts))}


def subject_lists(subjects, lists=None, ratios=(0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """The three subject lists: ``lists`` ({subset: ids}) checked against ``subjects``, or a seeded split."""
    if not lists or not any(lists.values()):
        return split_subjects(subjects, ratios, seed)
    lists = {subset: list(lists.get(subset) or []) for subset in SUBSETS}
    repeated = sorted({s for ids in lists.values() for s in ids if ids.count(s) > 1})
    if repeated:
        raise TrackflowError(f"subjects {repeated} are listed twice in one subject list")
    unknown = sorted(set().union(*lists.values()) - set(subjects))
    if unknown:
        raise TrackflowError(f"subjects {unknown} of the subject lists have no TractoFlow results folder")
    twice = sorted(s for s in set().union(*lists.values()) if sum(s in ids for ids in lists.values()) > 1)
    if twice:
        raise TrackflowError(f"subjects {twice} are in more than one subject list")
    if not lists["training"]:
        raise TrackflowError("the training subject list is empty")
    return lists


def prepare_tractoflow(results, out, lists=None, ratios=(0.7, 0.15, 0.15), seed: int = 0,
                       overwrite: bool = False) -> dict:
    """Lay out ``out/dwi_ml_ready`` (symlinks), ``out/hdf5_config.json`` and ``out/<subset>_subjs.txt``.

    Every file is checked before anything is written; ``out`` appears complete or not at all (an empty
    ``out``, as Snakemake leaves it, counts as absent). Returns the subject lists.
    """
    results, out = Path(results).resolve(), Path(out)
    subjects = tractoflow_subjects(results)
    lists = subject_lists(subjects, lists, ratios, seed)
    listed = sorted(set().union(*lists.values()))
    files = subject_files(results, listed)
    if out.resolve() == results or results.is_relative_to(out.resolve()) or out.resolve().is_relative_to(results):
        raise TrackflowError(f"the output folder {out} must lie outside the TractoFlow results {results}")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    check_outputs([out], overwrite, directories=True)
    groups = dict(GROUPS_CONFIG)
    if any(name.startswith("tractograms/") for name in files[listed[0]]):
        groups.update(STREAMLINES_GROUP)
    else:
        LOGGER.warning("no PFT_Tracking tractogram: the hdf5 has no streamline group (nothing to train on)")
    with atomic_directory(out, overwrite) as tmp:
        for s, links in files.items():
            for name, source in links.items():
                link = tmp / "dwi_ml_ready" / s / name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(source, link)
        (tmp / "hdf5_config.json").write_text(json.dumps(groups, indent=2) + "\n")
        for subset, ids in lists.items():
            (tmp / f"{subset}_subjs.txt").write_text("".join(f"{s}\n" for s in ids))
    LOGGER.info("%d subjects laid out in %s (%s)", len(listed), out,
                ", ".join(f"{len(lists[subset])} {subset}" for subset in SUBSETS))
    return lists
