# Training of the models that the config does not give as an existing experiment folder.


rule train_model:
    input:
        hdf5="results/hdf5/cohort.hdf5",
    output:
        # The experiment folder; the trainer refuses an existing one, and Snakemake removes it first.
        directory("results/models/{model}"),
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/models/{model}.tsv"
    wildcard_constraints:
        model=alternatives(TRAINED_MODELS),
    conda:
        "../../envs/trackflow.yaml"
    threads: 2
    resources:
        gpu=lambda wildcards: n_gpu(MODELS[wildcards.model]),
    params:
        script=model_script("train_model"),
        experiments_path=lambda wildcards, output: Path(output[0]).parent,
        input_group=lambda wildcards: MODELS[wildcards.model]["input_group"],
        streamline_group=lambda wildcards: MODELS[wildcards.model]["streamline_group"],
        options=training_options,
    shell:
        "{params.script} {params.experiments_path} {wildcards.model} {input.hdf5}"
        " {params.input_group} {params.streamline_group} {params.options} -v INFO > {log} 2>&1"
