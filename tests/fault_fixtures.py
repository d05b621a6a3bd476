"""Broken files for the fault-injection suite (tests/test_faults.py): each helper writes one kind of damage.

Every helper takes a good file (or none) and a destination and returns the destination, so that a case
builds its own damaged copy in its ``tmp_path`` and the session fixtures stay read-only.
"""

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch

FILE_FAULTS = ("missing", "empty", "garbage", "truncated", "directory")


def damaged_copy(kind: str, good: Path, dst: Path) -> Path:
    """``dst`` as ``good`` with one kind of damage (one of ``FILE_FAULTS``).

    missing: nothing at ``dst``; empty: 0 bytes; garbage: 4 KiB of random bytes; truncated: the first half
    of ``good``'s bytes (a .gz stream, an hdf5, a torch zip or a JSON text cut in the middle); directory:
    an (empty) folder where the file should be.
    """
    dst = Path(dst)
    data = Path(good).read_bytes() if kind == "truncated" else b""  # before dst (maybe good itself) goes
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    if kind == "missing":
        pass
    elif kind == "empty":
        dst.write_bytes(b"")
    elif kind == "garbage":
        dst.write_bytes(np.random.default_rng(7).bytes(4096))
    elif kind == "truncated":
        dst.write_bytes(data[:len(data) // 2])
    elif kind == "directory":
        dst.mkdir()
    else:
        raise ValueError(kind)
    return dst


def link_tree(src: Path, dst: Path) -> Path:
    """Folders copied, files symlinked: a cheap private copy in which a case replaces the file it damages
    (``damaged_copy`` unlinks the symlink first, so the original is never written)."""
    for root, _, files in os.walk(src):
        target = dst / Path(root).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).symlink_to(Path(root) / name)
    return dst


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


def nifti_like(good: Path, dst: Path, transform) -> Path:
    """``dst``: ``good``'s image with its data replaced by ``transform(data)`` (same affine unless the
    transform returns ``(data, affine)``)."""
    img = nib.load(str(good))
    result = transform(np.asarray(img.dataobj, dtype=np.float32).copy())
    data, affine = result if isinstance(result, tuple) else (result, img.affine)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(dst))
    return dst


def trk_with_nan(good: Path, dst: Path) -> Path:
    """``good``'s .trk with one coordinate of its first streamline set to NaN."""
    trk = nib.streamlines.load(str(good))
    lines = [np.array(s, copy=True) for s in trk.streamlines]
    lines[0][len(lines[0]) // 2, 1] = np.nan
    tractogram = nib.streamlines.Tractogram(lines, affine_to_rasmm=np.eye(4))
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    nib.streamlines.save(tractogram, str(dst), header=trk.header)
    return dst


def trk_on_other_grid(good: Path, dst: Path) -> Path:
    """``good``'s streamlines (world coordinates) in a .trk whose header grid differs (twice the voxel
    size, half the dimensions, shifted)."""
    trk = nib.streamlines.load(str(good))
    header = trk.header.copy()
    affine = np.array(header[nib.streamlines.Field.VOXEL_TO_RASMM], dtype=float)
    affine[:3, :3] *= 2.0
    affine[:3, 3] += 7.0
    header[nib.streamlines.Field.VOXEL_TO_RASMM] = affine
    header[nib.streamlines.Field.VOXEL_SIZES] = np.asarray(header[nib.streamlines.Field.VOXEL_SIZES]) * 2
    header[nib.streamlines.Field.DIMENSIONS] = np.maximum(
        np.asarray(header[nib.streamlines.Field.DIMENSIONS]) // 2, 1).astype(np.int16)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    nib.streamlines.save(nib.streamlines.Tractogram(trk.streamlines, affine_to_rasmm=np.eye(4)), str(dst),
                         header=header)
    return dst


class _RunsCode:
    """Unpickling this object creates the folder ``marker``: proof that loading ran foreign code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def malicious_pickle(dst: Path, marker: Path) -> Path:
    """A torch file (zip, as ``torch.save`` writes) whose unpickling would create ``marker``."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    torch.save({"state": _RunsCode(marker)}, dst)
    return dst


def hdf5_edited(good: Path, dst: Path, edit) -> Path:
    """A copy of the hdf5 ``good`` changed by ``edit(h5py.File)``."""
    shutil.copyfile(good, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def hdf5_corrupt_object_header(good: Path, dst: Path, name: str) -> Path:
    """A copy of the hdf5 whose object header of ``name`` is overwritten with 0xFF bytes (what a bad sector or
    a partial copy leaves): the file opens, reading that object fails."""
    shutil.copyfile(good, dst)
    with h5py.File(good, "r") as f:
        address = h5py.h5o.get_info(f[name].id).addr
    with open(dst, "r+b") as raw:
        raw.seek(address)
        raw.write(b"\xff" * 64)
    return dst


def snapshot(path: Path):
    """What a path holds, to tell an untouched old output from a changed one: None, a file's digest, or
    the sorted (relative path, digest) pairs of a folder."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return sorted((str(p.relative_to(path)), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                       else "dir") for p in path.rglob("*"))
    return None
