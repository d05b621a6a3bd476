# The report's own figures (snakemake --report): training curves per model, a snapshot and the length
# distribution of each tractogram, and the settings page.


rule plot_training_logs:
    input:
        experiment=experiment_dir,
    output:
        **{
            figure: report(
                f"results/report/training/{{model}}__{figure}.png",
                caption=f"../report/training_{figure}.rst",
                category="Training",
                subcategory="{model}",
                labels={"model": "{model}", "figure": figure.replace("_", " ")},
            )
            for figure in TRAINING_FIGURES
        },
    log:
        "logs/report/training/{model}.log",
    localrule: True
    conda:
        "../../envs/trackflow.yaml"
    params:
        prefix=lambda wildcards: f"results/report/training/{wildcards.model}__",
    shell:
        "dwiml_visualize_logs {input.experiment} --save_figures {params.prefix} -f -v INFO > {log} 2>&1"


rule tractogram_figures:
    input:
        tracked=output_name("tracking", f".{EXT}"),
        filtered=output_name("filtering", f".{EXT}"),
    output:
        snapshot=report(
            output_name("report", "_snapshot.png"),
            caption="../report/snapshot.rst",
            category="Tractograms",
            subcategory="{model}",
            labels={"subject": "{subject}", "model": "{model}", "figure": "snapshot"},
        ),
        lengths=report(
            output_name("report", "_lengths.png"),
            caption="../report/lengths.rst",
            category="Tractograms",
            subcategory="{model}",
            labels={"subject": "{subject}", "model": "{model}", "figure": "length distribution"},
        ),
    log:
        "logs/report/tractograms/{subject}/{model}.log",
    benchmark:
        "benchmarks/report/{subject}/{model}.tsv"
    conda:
        "../../envs/trackflow.yaml"
    params:
        min_length=FILTERING["min_length"],
        max_length=FILTERING["max_length"],
        # a subsample: enough to see the bundles, fast to draw
        max_streamlines=2000,
    script:
        "../../scripts/tractogram_figures.py"


rule report_settings:
    output:
        report(
            "results/report/settings.html",
            caption="../report/settings.rst",
            category="Settings",
            labels={"page": "settings and versions"},
        ),
    log:
        "logs/report/settings.log",
    localrule: True
    conda:
        "../../envs/trackflow.yaml"
    params:
        sections=settings_sections(),
    script:
        "../../scripts/report_settings.py"
