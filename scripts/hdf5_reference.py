"""Snakemake ``script:`` writing a subject's grid (shape, affine, voxel sizes of one hdf5 volume group) as a
NIfTI image: the reference of its .tck tractograms. Reads snakemake.input[0] (the hdf5), wildcards.subject and
params.group; writes snakemake.output[0]; logs to snakemake.log[0]."""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (set by Snakemake), before anything can fail

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from trackflow.data.hdf5.reader import HDF5Cohort  # noqa: E402
from trackflow.files import atomic_output  # noqa: E402

with HDF5Cohort(snakemake.input[0]) as reader:  # noqa: F821
    grid = reader.reference_nifti(snakemake.wildcards.subject, snakemake.params.group)  # noqa: F821
    image = nib.Nifti1Image(np.zeros(grid.shape, np.uint8), grid.affine, grid.header)
with atomic_output(snakemake.output[0]) as tmp:  # noqa: F821
    nib.save(image, tmp)
