# Tracking of every subject with every model, then length filtering of the tractograms.


rule track:
    input:
        experiment=experiment_dir,
        hdf5="results/hdf5/cohort.hdf5",
    output:
        output_name("tracking", f".{EXT}"),
    params:
        script=model_script("track_from_model"),
        input_group=lambda wildcards: MODELS[wildcards.model]["input_group"],
        seeding_mask_group=TRACKING["seeding_mask_group"],
        options=tracking_options(),
    resources:
        gpu=n_gpu(TRACKING),
    threads: 1
    log:
        "logs/tracking/{subject}/{model}.log",
    benchmark:
        "benchmarks/tracking/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    shell:
        "{params.script} {input.experiment} {wildcards.subject} {params.input_group} {output}"
        " {params.seeding_mask_group} --hdf5_file {input.hdf5} {params.options} -v INFO > {log} 2>&1"


rule filter_by_length:
    input:
        tractogram=output_name("tracking", f".{EXT}"),
        reference=filtering_reference,
    output:
        tractogram=output_name("filtering", f".{EXT}"),
        # one row: subject, model, streamline counts and lengths before and after
        counts=output_name("filtering", "_counts.tsv"),
    params:
        options=filtering_options(),
        reference=lambda wildcards, input: f"--reference {input.reference}" if input.reference else "",
    log:
        "logs/filtering/{subject}/{model}.log",
    benchmark:
        "benchmarks/filtering/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    shell:
        # scilpy's length filter, plus counts for the summary and .trx support
        "trackflow_filter_by_length {input.tractogram} {output.tractogram} --out_counts {output.counts}"
        " --subject {wildcards.subject} --model {wildcards.model} {params.options} {params.reference}"
        " -v INFO > {log} 2>&1"
