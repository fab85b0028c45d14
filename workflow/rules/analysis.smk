# Analyses of the MedSeqFT paper as pipeline outputs (config `analysis`): how far each method moves
# M0's weights (stages.drift, one job over every evaluated model) and the loss landscape around one
# model per method (stages.landscape, Li et al. 2018). Which models are compared is decided in
# analysis_common.smk, from the method registry in common.smk.


include: "analysis_common.smk"


rule parameter_drift:
    input:
        foundation=f"{FOUNDATION}/model.safetensors",
        models=get_drift_model_files(),
    output:
        table=f"{DRIFT}/drift.parquet",
        blocks=f"{DRIFT}/drift_blocks.parquet",
        heatmap=report(
            f"{DRIFT}/drift_blocks.png",
            caption="../report/drift.rst",
            category="4. Analyses",
            subcategory="Parameter variation",
        ),
        layers=report(
            f"{DRIFT}/drift_layers.png",
            caption="../report/drift.rst",
            category="4. Analyses",
            subcategory="Parameter variation",
        ),
        total=report(
            f"{DRIFT}/drift_total.png",
            caption="../report/drift.rst",
            category="4. Analyses",
            subcategory="Parameter variation",
        ),
    log:
        "logs/analysis/drift.log",
    benchmark:
        "benchmarks/analysis/drift.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=30,
    params:
        code=code_hash("drift"),
        foundation=input_dir("foundation"),
        models=drift_model_args(),
        out=output_dir("table"),
        settings=drift_settings(),
    shell:
        "python -m stages.drift --foundation {params.foundation:q} --model {params.models}"
        " --out {params.out:q} --settings {params.settings:q} > {log} 2>&1"


rule loss_landscape:
    input:
        model=get_landscape_model_file,
        manifest=get_landscape_manifest,
    output:
        table=f"{LANDSCAPE}/{{method}}/landscape.parquet",
        curve=report(
            landscape_figures(1),
            caption="../report/landscape.rst",
            category="4. Analyses",
            subcategory="Loss landscape",
        ),
        surface=report(
            landscape_figures(2),
            caption="../report/landscape.rst",
            category="4. Analyses",
            subcategory="Loss landscape",
        ),
    log:
        "logs/analysis/landscape_{method}.log",
    benchmark:
        "benchmarks/analysis/landscape_{method}.tsv"
    wildcard_constraints:
        method=alternatives(landscape_methods()),
    conda:
        "../../envs/segadapt.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(4000),
        runtime=120,
        gpu=gpu_resource(),
    params:
        code=code_hash("landscape"),
        model=input_dir("model"),
        data=input_dir("manifest"),
        task=LANDSCAPE_TASK or "",
        step=get_landscape_step,
        out=output_dir("table"),
        work=f"{RESULTS}/work/landscape/{{method}}",
        settings=landscape_settings(),
    shell:
        "python -m stages.landscape --model {params.model:q} --data {params.data:q} --task {params.task}"
        " --out {params.out:q} --work {params.work:q} --method {wildcards.method}"
        " --step {params.step} --settings {params.settings:q} > {log} 2>&1"
