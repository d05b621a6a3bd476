# Loss plots on the hdf5 streamlines, scores against ground truth, and the cohort summary.


rule visualize_loss:
    input:
        experiment=experiment_dir,
        hdf5="results/hdf5/cohort.hdf5",
    output:
        **loss_visualization_outputs(),
    log:
        "logs/loss/{subject}/{model}.log",
    benchmark:
        "benchmarks/loss/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        script=model_script("visualize_loss"),
        input_group=lambda wildcards: MODELS[wildcards.model]["input_group"],
        streamline_group=lambda wildcards: MODELS[wildcards.model]["streamline_group"],
        out_dir=lambda wildcards: f"results/loss/{wildcards.subject}",
        options=loss_visualization_options(),
    shell:
        "{params.script} {input.experiment} {input.hdf5} {wildcards.subject} {params.input_group}"
        " --streamlines_group {params.streamline_group} --out_dir {params.out_dir}"
        " --out_prefix {wildcards.subject}__{wildcards.model} {params.options} -v INFO > {log} 2>&1"


rule score:
    input:
        tractogram=output_name("filtering", f".{EXT}"),
        dwi_ml_ready=COHORT["dwi_ml_ready"],
    output:
        output_name("scores", ".json"),
    log:
        "logs/scores/{subject}/{model}.log",
    benchmark:
        "benchmarks/scores/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        bundles_dir=lambda wildcards: f"{COHORT['dwi_ml_ready']}/{wildcards.subject}/bundles",
        dilate_endpoints=config["scoring"]["dilate_endpoints"],
    shell:
        "trackflow_score {input.tractogram} {params.bundles_dir} {output}"
        " --dilate_endpoints {params.dilate_endpoints} -v INFO > {log} 2>&1"


rule summarize_cohort:
    input:
        counts=expand(output_name("filtering", "_counts.tsv"), subject=SUBJECTS, model=MODELS),
        scores=scored_outputs(),
        benchmarks=expand("benchmarks/tracking/{subject}/{model}.tsv", subject=SUBJECTS, model=MODELS),
    output:
        **summary_outputs(),
    log:
        "logs/summary/cohort_summary.log",
    benchmark:
        "benchmarks/summary/cohort_summary.tsv"
    localrule: True
    conda:
        "../../envs/trackflow.yaml"
    script:
        "../../scripts/cohort_summary.py"
