"""Snakemake ``script:`` of the report's pictures of one tractogram: the snapshot of the filtered tractogram
and the length distribution before and after filtering.

Reads snakemake.input.tracked and .filtered, wildcards subject and model, params.min_length, .max_length and
.max_streamlines; writes snakemake.output.snapshot and .lengths; logs to snakemake.log[0].
"""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (set by Snakemake), before anything can fail
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

from trackflow.visualization.snapshots import length_distribution, tractogram_snapshot  # noqa: E402

name = f"{snakemake.wildcards.subject}, {snakemake.wildcards.model}"  # noqa: F821
tractogram_snapshot(snakemake.input.filtered, snakemake.output.snapshot, name,  # noqa: F821
                    max_streamlines=snakemake.params.max_streamlines)  # noqa: F821
length_distribution(snakemake.input.tracked, snakemake.input.filtered, snakemake.output.lengths,  # noqa: F821
                    f"Streamline lengths before and after filtering ({name})",
                    snakemake.params.min_length, snakemake.params.max_length)  # noqa: F821
