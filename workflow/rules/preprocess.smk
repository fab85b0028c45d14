# Ingest and preprocess: validate every case, reorient, crop, resample, normalise -> .npy + manifest.


rule preprocess_task:
    input:
        dataset=get_task_dataset,
    output:
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
        cases=directory(f"{RESULTS}/data/{{task}}/cases"),
    log:
        "logs/preprocess/{task}.log",
    benchmark:
        "benchmarks/preprocess/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=30,
    params:
        code=code_hash("preprocess"),
        dataset=input_dir("dataset"),
        settings=get_task_preprocess_settings,
        out=output_dir("manifest"),
    shell:
        "python -m stages.preprocess --dataset {params.dataset:q} --out {params.out:q}"
        " --settings {params.settings:q} > {log} 2>&1"


rule preprocess_pool:
    input:
        dataset=get_pool_dataset,
    output:
        manifest=f"{RESULTS}/pool/manifest.parquet",
        cases=directory(f"{RESULTS}/pool/cases"),
    log:
        "logs/preprocess/pool.log",
    benchmark:
        "benchmarks/preprocess/pool.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=30,
    params:
        code=code_hash("preprocess"),
        dataset=input_dir("dataset"),
        settings=preprocess_settings(),
        out=output_dir("manifest"),
    shell:
        "python -m stages.preprocess --dataset {params.dataset:q} --out {params.out:q}"
        " --settings {params.settings:q} > {log} 2>&1"
