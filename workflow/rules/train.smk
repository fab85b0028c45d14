# Training jobs. Resumable state lives under results/work/, which is never a declared output, so an
# interrupted job is not wiped by Snakemake and resumes on the next run.


rule train_parallel_ft:
    input:
        init=f"{FOUNDATION}/model.safetensors",
        manifest=f"{RESULTS}/data/{{task}}/manifest.parquet",
    output:
        model=f"{RESULTS}/runs/parallel_ft/{{task}}/model.safetensors",
        spec=f"{RESULTS}/runs/parallel_ft/{{task}}/model.json",
        log_table=f"{RESULTS}/runs/parallel_ft/{{task}}/train_log.parquet",
    params:
        code=code_hash("train"),
        settings=train_settings(),
    log:
        "logs/train/parallel_ft/{task}.log",
    benchmark:
        "benchmarks/train/parallel_ft/{task}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpu_resource(),
    shell:
        "OMP_NUM_THREADS={threads} python -m stages.train --recipe finetune --init {FOUNDATION}"
        " --data {RESULTS}/data/{wildcards.task} --task {wildcards.task}"
        " --out {RESULTS}/runs/parallel_ft/{wildcards.task} --work {RESULTS}/work/parallel_ft/{wildcards.task}"
        " --settings {params.settings:q} > {log} 2>&1"
