"""Snakemake ``script:`` of the cohort summary: one table row per subject and model, and the report plots.

Reads snakemake.input.counts (``trackflow_filter_by_length`` TSVs) and, when the rule declares them,
snakemake.input.scores (``trackflow_score`` JSONs), .benchmarks (benchmark TSVs) and .tractograms (filtered
tractograms, for the length histograms). Writes snakemake.output.table and whichever of the plots
streamline_counts, lengths, bundle_scores, overall_scores the rule names as outputs. Logs to
snakemake.log[0].
"""

import logging
import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (set by Snakemake), before anything can fail
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

from trackflow.visualization.summary import PLOTS, summarize_cohort, write_cohort_summary  # noqa: E402

summary = summarize_cohort(
    snakemake.input.counts,  # noqa: F821
    score_files=snakemake.input.get("scores", []),  # noqa: F821
    benchmark_files=snakemake.input.get("benchmarks", []),  # noqa: F821
    tractogram_files=snakemake.input.get("tractograms", []))  # noqa: F821
write_cohort_summary(summary, snakemake.output.table,  # noqa: F821
                     {name: snakemake.output.get(name) for name in PLOTS  # noqa: F821
                      if snakemake.output.get(name) is not None})  # noqa: F821
