"""Snakemake ``script:`` of the report's settings page: the config sections that produced the results and
the versions of the software that ran.

Reads snakemake.params.sections ({title: {setting: value}}); writes snakemake.output[0] (HTML); logs to
snakemake.log[0].
"""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (set by Snakemake), before anything can fail
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

from trackflow.visualization.summary import package_versions, write_settings_page  # noqa: E402

write_settings_page(snakemake.output[0], snakemake.params.sections, package_versions())  # noqa: F821
