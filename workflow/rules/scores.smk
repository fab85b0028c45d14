# Per-task scores under M0: pooled encoder features and the SSL-loss score (MDS, DKD).


rule extract_features:
    input:
        model=f"{FOUNDATION}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        f"{RESULTS}/scores/{{task}}/features.parquet",
    params:
        code=code_hash("features"),
        settings=settings({"patch_size": config["foundation"]["ssl"]["patch_size"], "device": config["device"]}),
    log:
        "logs/features/{task}.log",
    benchmark:
        "benchmarks/features/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=gpu_resource(),
    shell:
        "python -m stages.features --model {FOUNDATION} --data {RESULTS}/data/{wildcards.task} --out {output:q}"
        " --settings {params.settings:q} > {log} 2>&1"


rule score_ssl:
    input:
        model=f"{FOUNDATION}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        f"{RESULTS}/scores/{{task}}/ssl.parquet",
    params:
        code=code_hash("ssl_scores"),
        settings=settings(
            {
                **config["scoring"],
                "ssl": config["foundation"]["ssl"],
                "seed": config["seed"],
                "device": config["device"],
            }
        ),
    log:
        "logs/ssl_scores/{task}.log",
    benchmark:
        "benchmarks/ssl_scores/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=gpu_resource(),
    shell:
        "OMP_NUM_THREADS={threads} python -m stages.ssl_scores --model {FOUNDATION}"
        " --data {RESULTS}/data/{wildcards.task} --out {output:q} --settings {params.settings:q} > {log} 2>&1"
