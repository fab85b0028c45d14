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


# Every task dataset validated and preprocessed: M0's pre-training waits for this marker (as an
# ancient input, so a task added later rewrites the marker without retraining M0).
rule data_ready:
    input:
        manifests=[f"{RESULTS}/data/{t}/manifest.parquet" for t in TASKS],
    output:
        marker=f"{RESULTS}/data/ready.json",
    log:
        "logs/preprocess/data_ready.log",
    benchmark:
        "benchmarks/preprocess/data_ready.tsv"
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(1000),
        runtime=5,
    params:
        code=code_hash("data_ready"),
    shell:
        "python -m stages.data_ready --manifests {input.manifests:q} --out {output.marker:q} > {log} 2>&1"
