# Training jobs, one rule per kind of step. Resumable state lives under results/work/, never a
# declared output, so an interrupted job is not wiped by Snakemake and resumes on the next run.
# Which model a step starts from (M0, or the previous step's model) is decided in common.smk.


rule train_full_ft:
    input:
        init=get_start_model_file,
        manifest=get_step_manifest,
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/train_log.parquet",
    log:
        "logs/train/{method}/{step}.log",
    benchmark:
        "benchmarks/train/{method}/{step}.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(FULL_FT)),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=240,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        init=input_dir("init"),
        data=input_dir("manifest"),
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/{{step}}",
        settings=get_train_settings,
    shell:
        "python -m stages.train --recipe finetune --threads {threads} --init {params.init:q} --data {params.data:q}"
        " --task {wildcards.step} --out {params.out:q} --work {params.work:q}"
        " --settings {params.settings:q} > {log} 2>&1"


rule train_teacher:
    input:
        init=get_start_model_file,
        manifest=get_step_manifest,
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/teacher/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/teacher/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/teacher/train_log.parquet",
    log:
        "logs/train/{method}/{step}_teacher.log",
    benchmark:
        "benchmarks/train/{method}/{step}_teacher.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(list(KGRFT))),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=240,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        init=input_dir("init"),
        data=input_dir("manifest"),
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/{{step}}/teacher",
        settings=get_train_settings,
    shell:
        "python -m stages.train --recipe finetune --threads {threads} --init {params.init:q} --data {params.data:q}"
        " --task {wildcards.step} --out {params.out:q} --work {params.work:q}"
        " --settings {params.settings:q} > {log} 2>&1"


rule train_retention:
    input:
        init=get_start_model_file,
        manifest=get_step_manifest,
        teacher=get_teacher_file,
        buffers=get_buffer_tables,
        buffer_data=get_buffer_manifests,
    output:
        adapter=f"{RESULTS}/runs/{{method}}/{{step}}/adapter/adapter_model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/adapter/adapter_config.json",
        record=f"{RESULTS}/runs/{{method}}/{{step}}/adapter/run.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/adapter/train_log.parquet",
    log:
        "logs/train/{method}/{step}_retention.log",
    benchmark:
        "benchmarks/train/{method}/{step}_retention.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(LORA)),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=240,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        init=input_dir("init"),
        data=input_dir("manifest"),
        teacher=get_teacher_arg,
        buffers=get_buffer_args,
        out=output_dir("adapter"),
        work=f"{RESULTS}/work/{{method}}/{{step}}/adapter",
        settings=get_retention_settings,
    shell:
        "python -m stages.train --recipe retention --threads {threads} --init {params.init:q} --data {params.data:q}"
        " --task {wildcards.step} {params.teacher} --buffer {params.buffers} --out {params.out:q}"
        " --work {params.work:q} --settings {params.settings:q} > {log} 2>&1"


rule train_retention_full:
    input:
        init=get_start_model_file,
        manifest=get_step_manifest,
        teacher=get_teacher_file,
        buffers=get_buffer_tables,
        buffer_data=get_buffer_manifests,
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/train_log.parquet",
    log:
        "logs/train/{method}/{step}_retention.log",
    benchmark:
        "benchmarks/train/{method}/{step}_retention.tsv"
    wildcard_constraints:
        method=alternatives(
            runs_of([m for m, spec in KGRFT.items() if not spec["lora"]])
        ),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=240,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        init=input_dir("init"),
        data=input_dir("manifest"),
        teacher=get_teacher_arg,
        buffers=get_buffer_args,
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/{{step}}/retention",
        settings=get_retention_settings,
    shell:
        "python -m stages.train --recipe retention --threads {threads} --init {params.init:q} --data {params.data:q}"
        " --task {wildcards.step} {params.teacher} --buffer {params.buffers} --out {params.out:q}"
        " --work {params.work:q} --settings {params.settings:q} > {log} 2>&1"


rule merge_adapter:
    input:
        base=get_start_model_file,
        adapter=f"{RESULTS}/runs/{{method}}/{{step}}/adapter/adapter_model.safetensors",
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
    log:
        "logs/merge/{method}/{step}.log",
    benchmark:
        "benchmarks/merge/{method}/{step}.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(LORA)),
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=10,
    params:
        code=code_hash("merge"),
        base=input_dir("base"),
        adapter=input_dir("adapter"),
        out=output_dir("model"),
    shell:
        "python -m stages.merge --base {params.base:q} --adapter {params.adapter:q} --out {params.out:q} > {log} 2>&1"


rule train_multitask:
    input:
        init=f"{FOUNDATION}/model.safetensors",
        manifests=expand(f"{RESULTS}/data/{{task}}/manifest.parquet", task=ORDER),
    output:
        model=f"{RESULTS}/runs/{{method}}/all/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/all/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/all/train_log.parquet",
    log:
        "logs/train/{method}/all.log",
    benchmark:
        "benchmarks/train/{method}/all.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(MULTITASK)),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=480,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        init=input_dir("init"),
        data=input_dirs("manifests"),
        tasks=" ".join(ORDER),
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/all",
        settings=get_train_settings,
    shell:
        "python -m stages.train --recipe multitask --threads {threads} --init {params.init:q} --data {params.data}"
        " --task {params.tasks} --out {params.out:q} --work {params.work:q}"
        " --settings {params.settings:q} > {log} 2>&1"
