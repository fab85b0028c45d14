# Prediction of the test split in original geometry, metrics per case and class, and the summary.


rule predict_test_cases:
    input:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        table=f"{RESULTS}/eval/{{method}}/{{step}}/{{task}}/predictions/predictions.parquet",
    params:
        code=code_hash("predict"),
        settings=inference_settings(),
    log:
        "logs/predict/{method}/{step}/{task}.log",
    benchmark:
        "benchmarks/predict/{method}/{step}/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_resource(),
    shell:
        "python -m stages.predict --model {RESULTS}/runs/{wildcards.method}/{wildcards.step}"
        " --head {wildcards.task} --data {RESULTS}/data/{wildcards.task} --split test"
        " --out {RESULTS}/eval/{wildcards.method}/{wildcards.step}/{wildcards.task}/predictions"
        " --settings {params.settings:q} > {log} 2>&1"


rule evaluate_predictions:
    input:
        predictions=f"{RESULTS}/eval/{{method}}/{{step}}/{{task}}/predictions/predictions.parquet",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        f"{RESULTS}/eval/{{method}}/{{step}}/{{task}}/metrics.parquet",
    params:
        code=code_hash("evaluate"),
        settings=settings({**config["evaluate"], "seed": config["seed"]}),
    log:
        "logs/evaluate/{method}/{step}/{task}.log",
    benchmark:
        "benchmarks/evaluate/{method}/{step}/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m stages.evaluate --predictions {RESULTS}/eval/{wildcards.method}/{wildcards.step}/{wildcards.task}/predictions"
        " --data {RESULTS}/data/{wildcards.task} --out {output:q} --method {wildcards.method}"
        " --step {wildcards.step} --task {wildcards.task} --settings {params.settings:q} > {log} 2>&1"


rule aggregate_metrics:
    input:
        get_metrics_tables(),
    output:
        metrics=f"{RESULTS}/summary/metrics.parquet",
        summary=f"{RESULTS}/summary/summary.parquet",
        table=f"{RESULTS}/summary/summary.md",
    params:
        code=code_hash("aggregate"),
    log:
        "logs/aggregate/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    conda:
        "../../envs/segadapt.yaml"
    localrule: True
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m stages.aggregate --metrics {input:q} --out {RESULTS}/summary > {log} 2>&1"
