# Training jobs, one rule per kind of step; every job that trains one model on one task is
# train_full_ft or a rule derived from it (here and in active.smk), which differ in files only. Resumable state lives under results/work/, never a
# declared output, so an interrupted job is not wiped by Snakemake and resumes on the next run.
# Which model a step starts from (M0, or the previous step's model) is decided in common.smk.


rule train_full_ft:
    input:
        init=get_start_model_file,
        manifest=get_step_manifest,
        fisher=get_fisher_file,
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/train_log.parquet",
    log:
        "logs/train/{method}/{step}.log",
    benchmark:
        "benchmarks/train/{method}/{step}.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(SINGLE_JOB)),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=240,
        gpu=gpu_resource(),
    params:
        code=code_hash("train"),
        recipe=get_recipe,
        task="{step}",
        init=input_dir("init"),
        data=input_dir("manifest"),
        extra=get_fisher_arg,
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/{{step}}",
        settings=get_train_settings,
    shell:
        "python -m stages.train --recipe {params.recipe} --threads {threads} --init {params.init:q}"
        " --data {params.data:q} --task {params.task} {params.extra} --out {params.out:q}"
        " --work {params.work:q} --settings {params.settings:q} > {log} 2>&1"


# K&G RFT's knowledge stage: full fine-tuning of the same start model on the task (teacher T_t)
use rule train_full_ft as train_teacher with:
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
        method=alternatives(runs_of(KGRFT)),
    params:
        recipe="finetune",
        extra="",
        work=f"{RESULTS}/work/{{method}}/{{step}}/teacher",


# the first step of sequential FT, EWC and LwF, when it is parallel FT's first-step job (config
# reuse_first_steps; common.smk's reused_first_step): copied, not trained again
rule reuse_first_step:
    input:
        files=get_reused_first_step_files,
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/train_log.parquet",
        record=f"{RESULTS}/runs/{{method}}/{{step}}/reused_from.json",
    log:
        "logs/train/{method}/{step}_reused.log",
    benchmark:
        "benchmarks/train/{method}/{step}_reused.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(REUSED_FIRST)),
        step=ORDER[0],
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(1000),
    params:
        code=code_hash("reuse"),
        source=lambda wildcards, input: shell_args(Path(input.files[0]).parent),
        out=output_dir("model"),
    shell:
        "python -m stages.reuse --source {params.source} --out {params.out:q}"
        " --why 'plain full FT of M0 on the first task: the same job as parallel FT' > {log} 2>&1"


ruleorder: reuse_first_step > train_full_ft


# online EWC's diagonal Fisher of a step's model on its task's training data, accumulated over the
# chain's earlier steps (read by the next step's training)
rule estimate_fisher:
    input:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        manifest=get_step_manifest,
        previous=get_fisher_file,
    output:
        fisher=f"{RESULTS}/runs/{{method}}/{{step}}/fisher/fisher.safetensors",
        record=f"{RESULTS}/runs/{{method}}/{{step}}/fisher/fisher.json",
    log:
        "logs/fisher/{method}/{step}.log",
    benchmark:
        "benchmarks/fisher/{method}/{step}.tsv"
    wildcard_constraints:
        method=alternatives(runs_of(EWC)),
    conda:
        "../../envs/segadapt.yaml"
    threads: train_threads()
    resources:
        mem_mb=memory_mb(8000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("fisher"),
        model=input_dir("model"),
        data=input_dir("manifest"),
        previous=get_previous_fisher_arg,
        out=output_dir("fisher"),
        settings=get_fisher_settings,
    shell:
        "python -m stages.fisher --threads {threads} --model {params.model:q} --data {params.data:q}"
        " --task {wildcards.step} {params.previous} --out {params.out:q}"
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


# the no-LoRA ablation: the same retention stage training every weight, writing a whole model
use rule train_retention as train_retention_full with:
    output:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        spec=f"{RESULTS}/runs/{{method}}/{{step}}/model.json",
        log_table=f"{RESULTS}/runs/{{method}}/{{step}}/train_log.parquet",
    wildcard_constraints:
        method=alternatives(runs_of([m for m in KGRFT if not METHOD[m].lora])),
    params:
        out=output_dir("model"),
        work=f"{RESULTS}/work/{{method}}/{{step}}/retention",


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
