# The cohort: the synthetic demo (demo.enabled) or TractoFlow results laid out (tractoflow.results), its hdf5
# file, and the subjects' grids as NIfTI references for .tck tractograms.


rule make_demo:
    output:
        dwi_ml_ready=directory("results/demo/dwi_ml_ready"),
        hdf5_config="results/demo/config/hdf5_config.json",
        subject_lists=expand("results/demo/config/{subset}_subjs.txt", subset=["training", "validation", "testing"]),
        readme="results/demo/README.txt",
    log:
        "logs/demo/make_demo.log",
    benchmark:
        "benchmarks/demo/make_demo.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        out_dir=lambda wildcards, output: Path(output.readme).parent,
        subjects=config["demo"]["subjects"],
        seed=config["demo"]["seed"],
    shell:
        # Snakemake creates the (empty) folder of the declared config files, and trackflow_make_demo -f
        # writes only into an empty folder or an older demo: hand it an empty one.
        "rmdir {params.out_dir}/config && trackflow_make_demo {params.out_dir}"
        " --subjects {params.subjects} --seed {params.seed} -f -v INFO > {log} 2>&1"


rule create_hdf5:
    input:
        dwi_ml_ready=COHORT["dwi_ml_ready"],
        hdf5_config=COHORT["hdf5_config"],
        training=COHORT["training_subjects"],
        validation=COHORT["validation_subjects"],
        testing=COHORT["testing_subjects"],
    output:
        "results/hdf5/cohort.hdf5",
    log:
        "logs/hdf5/cohort.log",
    benchmark:
        "benchmarks/hdf5/cohort.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        options=hdf5_options(),
    shell:
        "dwiml_create_hdf5_dataset {input.dwi_ml_ready} {output} {input.hdf5_config} {input.training}"
        " {input.validation} {input.testing} {params.options} -v INFO > {log} 2>&1"


rule prepare_tractoflow:
    input:
        # the folder only, not its files: the workflow does not follow TractoFlow's own reruns
        ancient(TRACTOFLOW["results"] or []),
    output:
        dwi_ml_ready=directory("results/cohort/dwi_ml_ready"),
        hdf5_config="results/cohort/hdf5_config.json",
        subject_lists=expand("results/cohort/{subset}_subjs.txt", subset=["training", "validation", "testing"]),
    log:
        "logs/cohort/prepare_tractoflow.log",
    benchmark:
        "benchmarks/cohort/prepare_tractoflow.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        out_dir=lambda wildcards, output: Path(output.hdf5_config).parent,
        # the lists computed at DAG time (the same library call), so that the DAG's subjects are the ones laid out
        lists=" ".join(f"--{subset} {' '.join(ids)}" for subset, ids in (TRACTOFLOW_LISTS or {}).items() if ids),
    shell:
        "trackflow_prepare_tractoflow {input} {params.out_dir} {params.lists} -f -v INFO > {log} 2>&1"


rule hdf5_reference:
    input:
        "results/hdf5/cohort.hdf5",
    output:
        "results/hdf5/references/{subject}.nii.gz",
    log:
        "logs/hdf5/references/{subject}.log",
    conda:
        "../../envs/trackflow.yaml"
    params:
        group=TRACKING["seeding_mask_group"],
    script:
        "../../scripts/hdf5_reference.py"
