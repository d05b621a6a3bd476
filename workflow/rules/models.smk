# Training of the models that the config does not give as an existing experiment folder.


rule train_model:
    input:
        hdf5="results/hdf5/cohort.hdf5",
    output:
        # The experiment folder; the trainer refuses an existing one, and Snakemake removes it first.
        directory("results/models/{model}"),
    wildcard_constraints:
        model=alternatives(TRAINED_MODELS),
    params:
        script=model_script("train_model"),
        experiments_path=lambda wildcards, output: Path(output[0]).parent,
        input_group=lambda wildcards: MODELS[wildcards.model]["input_group"],
        streamline_group=lambda wildcards: MODELS[wildcards.model]["streamline_group"],
        options=training_options,
    resources:
        gpu=lambda wildcards: n_gpu(MODELS[wildcards.model]),
    threads: 2
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/models/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    shell:
        "{params.script} {params.experiments_path} {wildcards.model} {input.hdf5}"
        " {params.input_group} {params.streamline_group} {params.options} -v INFO > {log} 2>&1"
