# Tracking of every subject with every model, then length filtering of the tractograms.


CHUNKS = int(TRACKING["chunks"])
if CHUNKS > 1 and TRACKING["nt"] is None:
    raise WorkflowError("config tracking: chunks > 1 needs nt (the seed count of each chunk's range).")
# Seed ranges [a, b) of the chunks: consecutive, together all nt seeds.
CHUNK_BOUNDS = [TRACKING["nt"] * k // CHUNKS for k in range(CHUNKS + 1)] if CHUNKS > 1 else None
TRACK_OUTPUT = (
    output_name("tracking", f".{EXT}")
    if CHUNKS == 1
    else f"results/tracking/{{subject}}/chunks/{{subject}}__{{model}}_{{chunk}}.{EXT}"
)
LOG_NAME = "{subject}/{model}" if CHUNKS == 1 else "{subject}/{model}_{chunk}"


rule track:
    input:
        experiment=experiment_dir,
        hdf5="results/hdf5/cohort.hdf5",
    output:
        TRACK_OUTPUT if CHUNKS == 1 else temp(TRACK_OUTPUT),
    log:
        f"logs/tracking/{LOG_NAME}.log",
    benchmark:
        f"benchmarks/tracking/{LOG_NAME}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    threads: 1
    resources:
        gpu=n_gpu(TRACKING),
    params:
        script=model_script("track_from_model"),
        input_group=lambda wildcards: MODELS[wildcards.model]["input_group"],
        seeding_mask_group=TRACKING["seeding_mask_group"],
        options=tracking_options(),
        seed_range=lambda wildcards: (
            f"--seed_range {CHUNK_BOUNDS[int(wildcards.chunk)]} {CHUNK_BOUNDS[int(wildcards.chunk) + 1]}"
            if CHUNKS > 1
            else ""
        ),
        # as many processes as the job's threads (the CLI's default is every core of the machine)
        processes="" if n_gpu(TRACKING) else "--processes 1",
    shell:
        "{params.script} {input.experiment} {wildcards.subject} {params.input_group} {output}"
        " {params.seeding_mask_group} --hdf5_file {input.hdf5} {params.options} {params.seed_range}"
        " {params.processes} -v INFO > {log} 2>&1"


if CHUNKS > 1:

    rule merge_tracking_chunks:
        input:
            expand(
                f"results/tracking/{{{{subject}}}}/chunks/{{{{subject}}}}__{{{{model}}}}_{{chunk}}.{EXT}",
                chunk=range(CHUNKS),
            ),
        output:
            output_name("tracking", f".{EXT}"),
        log:
            "logs/tracking/{subject}/{model}_merge.log",
        # the file the cohort summary reads; with chunks it times the merge only (the chunks' own times are
        # in benchmarks/tracking/{subject}/{model}_{chunk}.tsv)
        benchmark:
            "benchmarks/tracking/{subject}/{model}.tsv"
        conda:
            "../../envs/trackflow.yaml"
        shell:
            "trackflow_merge_tractograms {output} {input} -f -v INFO > {log} 2>&1"


rule filter_by_length:
    input:
        tractogram=output_name("tracking", f".{EXT}"),
        reference=filtering_reference,
    output:
        tractogram=output_name("filtering", f".{EXT}"),
        # one row: subject, model, streamline counts and lengths before and after
        counts=output_name("filtering", "_counts.tsv"),
    log:
        "logs/filtering/{subject}/{model}.log",
    benchmark:
        "benchmarks/filtering/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        options=filtering_options(),
        reference=lambda wildcards, input: f"--reference {input.reference}" if input.reference else "",
    shell:
        # scilpy's length filter, plus counts for the summary and .trx support
        "trackflow_filter_by_length {input.tractogram} {output.tractogram} --out_counts {output.counts}"
        " --subject {wildcards.subject} --model {wildcards.model} {params.options} {params.reference}"
        " -v INFO > {log} 2>&1"
