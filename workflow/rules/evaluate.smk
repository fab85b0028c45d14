# Evaluation of every trained model on the test split of each task it carries a head for
# (predictions in original geometry + Dice/HD95/NSD); the summary is in report.smk. A run of another
# training seed (method wildcard `{method}/seed{s}`) records its method name and its seed in the metrics.


rule evaluate_model:
    input:
        model=f"{RESULTS}/runs/{{method}}/{{step}}/model.safetensors",
        manifests=get_eval_manifests,
    output:
        metrics=f"{RESULTS}/eval/{{method}}/{{step}}/metrics.parquet",
        predictions=directory(f"{RESULTS}/eval/{{method}}/{{step}}/predictions"),
    log:
        "logs/evaluate/{method}/{step}.log",
    benchmark:
        "benchmarks/evaluate/{method}/{step}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("evaluate"),
        model=input_dir("model"),
        tasks=get_eval_task_names,
        data=input_dirs("manifests"),
        out=output_dir("metrics"),
        method=get_eval_method,
        settings=get_eval_settings,
    shell:
        "python -m stages.evaluate --model {params.model:q} --task {params.tasks} --data {params.data}"
        " --out {params.out:q} --method {params.method} --step {wildcards.step}"
        " --settings {params.settings:q} > {log} 2>&1"
