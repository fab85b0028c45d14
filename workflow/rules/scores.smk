# Per-task scores under M0: pooled encoder features and the SSL-loss score (MDS, DKD).


rule extract_features:
    input:
        model=f"{FOUNDATION}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        f"{RESULTS}/scores/{{task}}/features.parquet",
    log:
        "logs/features/{task}.log",
    benchmark:
        "benchmarks/features/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=30,
        gpu=gpu_resource(),
    params:
        code=code_hash("features"),
        model=input_dir("model"),
        data=input_dir("manifest"),
        settings=settings(
            {
                "patch_size": config["foundation"]["ssl"]["patch_size"],
                "device": config["device"],
            }
        ),
    shell:
        "python -m stages.features --model {params.model:q} --data {params.data:q} --out {output:q}"
        " --settings {params.settings:q} > {log} 2>&1"


rule score_ssl:
    input:
        model=f"{FOUNDATION}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        f"{RESULTS}/scores/{{task}}/ssl.parquet",
    log:
        "logs/ssl_scores/{task}.log",
    benchmark:
        "benchmarks/ssl_scores/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("ssl_scores"),
        model=input_dir("model"),
        data=input_dir("manifest"),
        settings=settings(
            {
                **config["scoring"],
                "ssl": config["foundation"]["ssl"],
                "seed": config["seed"],
                "device": config["device"],
            }
        ),
    shell:
        "python -m stages.ssl_scores --model {params.model:q}"
        " --data {params.data:q} --out {output:q} --settings {params.settings:q} > {log} 2>&1"
