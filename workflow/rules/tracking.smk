# Tracking of every subject with every model, then length filtering of the tractograms.


rule track:
    input:
        experiment=experiment_dir,
        hdf5="results/hdf5/cohort.hdf5",
    output:
        f"results/tracking/{{subject}}/{{model}}.{EXT}",
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
        f"results/tracking/{{subject}}/{{model}}.{EXT}",
    output:
        tractogram=f"results/filtering/{{subject}}/{{model}}.{EXT}",
        # one row: subject, model, streamline counts and lengths before and after
        counts="results/filtering/{subject}/{model}_counts.tsv",
    params:
        options=filtering_options,
    log:
        "logs/filtering/{subject}/{model}.log",
    benchmark:
        "benchmarks/filtering/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    shell:
        # scilpy's length filter, plus counts for the summary and .trx support
        "trackflow_filter_by_length {input} {output.tractogram} --out_counts {output.counts}"
        " --subject {wildcards.subject} --model {wildcards.model} {params.options} -v INFO > {log} 2>&1"
