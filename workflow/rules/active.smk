# ASSFT: per strategy and seed, query rounds on the target task's unlabelled pool (its train split),
# annotation (oracle or inbox), fine-tuning on the labelled set, and after the last round selective
# semi-supervised fine-tuning, beside its equal-steps control (the same continuation on the labelled
# cases only). Every model is evaluated on the target's test split (budget curves). A chain's seed
# seeds its queries and its training.


rule query_round:
    input:
        manifest=f"{RESULTS}/data/{TARGET}/manifest.parquet",
        ssl=f"{RESULTS}/scores/{TARGET}/ssl.parquet",
        features=f"{RESULTS}/scores/{TARGET}/features.parquet",
        previous=get_previous_labelled,
        model=get_previous_round_model,
    output:
        f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/query.parquet",
    log:
        "logs/query_round/{query}/seed{seed}/round{round}.log",
    benchmark:
        "benchmarks/query_round/{query}/seed{seed}/round{round}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("query_round"),
        task=TARGET,
        data=input_dir("manifest"),
        labelled=get_labelled_arg,
        model=get_round_model_arg,
        settings=get_query_settings,
    shell:
        "python -m stages.query_round --data {params.data:q} --task {params.task} --ssl-scores {input.ssl:q}"
        " --features {input.features:q} --round {wildcards.round} {params.labelled} {params.model}"
        " --out {output:q} --settings {params.settings:q} > {log} 2>&1"


rule annotate_round:
    input:
        query=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/query.parquet",
        manifest=f"{RESULTS}/data/{TARGET}/manifest.parquet",
        previous=get_previous_labelled,
    output:
        labelled=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/labelled.parquet",
        manifest=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/manifest.parquet",
    log:
        "logs/annotate/{query}/seed{seed}/round{round}.log",
    benchmark:
        "benchmarks/annotate/{query}/seed{seed}/round{round}.tsv"
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(2000),
        runtime=10,
    params:
        code=code_hash("annotate"),
        data=input_dir("manifest"),
        previous=get_previous_arg,
        inbox=get_inbox_arg,
        out=output_dir("labelled"),
        settings=settings({"mode": config["assft"]["annotation"]}),
    shell:
        "python -m stages.annotate --query {input.query:q} --data {params.data:q} {params.previous}"
        " {params.inbox} --out {params.out:q} --settings {params.settings:q} > {log} 2>&1"


# a round's fine-tuning of the start model on the labelled cases (train_full_ft's job, other files)
use rule train_full_ft as train_round with:
    input:
        init=f"{active_start_model()}/model.safetensors",
        manifest=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/manifest.parquet",
    output:
        model=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/model.safetensors",
        spec=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/model.json",
        log_table=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/train_log.parquet",
    log:
        "logs/train_round/{query}/seed{seed}/round{round}.log",
    benchmark:
        "benchmarks/train_round/{query}/seed{seed}/round{round}.tsv"
    params:
        recipe="finetune",
        task=TARGET,
        extra="",
        work=f"{RESULTS}/work/active/{{query}}/seed{{seed}}/round{{round}}",
        settings=get_chain_train_settings,


rule select_pseudo_labels:
    input:
        model=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/model.safetensors",
        manifest=f"{RESULTS}/data/{TARGET}/manifest.parquet",
        labelled=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/labelled.parquet",
        features=f"{RESULTS}/scores/{TARGET}/features.parquet",
    output:
        table=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/pseudo_{{semi}}/pseudo.parquet",
    log:
        "logs/select_pseudo/{query}/seed{seed}/round{round}_{semi}.log",
    benchmark:
        "benchmarks/select_pseudo/{query}/seed{seed}/round{round}_{semi}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("select_pseudo"),
        task=TARGET,
        model=input_dir("model"),
        data=input_dir("manifest"),
        out=output_dir("table"),
        settings=get_pseudo_settings,
    shell:
        "python -m stages.select_pseudo --model {params.model:q} --task {params.task} --data {params.data:q}"
        " --labelled {input.labelled:q} --features {input.features:q} --out {params.out:q}"
        " --settings {params.settings:q} > {log} 2>&1"


# ASSFT's selective semi-supervised fine-tuning of the last round's model (labelled + kept pseudo-labels)
use rule train_round as train_semisupervised with:
    input:
        init=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/model.safetensors",
        manifest=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/manifest.parquet",
        pseudo=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/pseudo_{{semi}}/pseudo.parquet",
    output:
        model=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_{{semi}}/model.safetensors",
        spec=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_{{semi}}/model.json",
        log_table=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_{{semi}}/train_log.parquet",
    log:
        "logs/train_semisupervised/{query}/seed{seed}/round{round}_{semi}.log",
    benchmark:
        "benchmarks/train_semisupervised/{query}/seed{seed}/round{round}_{semi}.tsv"
    params:
        recipe="semisupervised",
        extra=get_pseudo_arg,
        work=f"{RESULTS}/work/active/{{query}}/seed{{seed}}/round{{round}}_{{semi}}",
        settings=get_semi_settings,


# the equal-steps control: the round model fine-tuned as long again on the labelled cases only
use rule train_round as train_continue with:
    input:
        init=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_l/model.safetensors",
        manifest=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/labelled/manifest.parquet",
    output:
        model=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_continue/model.safetensors",
        spec=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_continue/model.json",
        log_table=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/model_continue/train_log.parquet",
    log:
        "logs/train_continue/{query}/seed{seed}/round{round}.log",
    benchmark:
        "benchmarks/train_continue/{query}/seed{seed}/round{round}.tsv"
    threads: 1
    params:
        work=f"{RESULTS}/work/active/{{query}}/seed{{seed}}/round{{round}}_continue",


rule evaluate_active_model:
    input:
        model=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/{{kind}}/model.safetensors",
        manifest=f"{RESULTS}/data/{TARGET}/manifest.parquet",
    output:
        metrics=f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/eval_{{kind}}/metrics.parquet",
        predictions=directory(
            f"{ACTIVE}/{{query}}/seed{{seed}}/round{{round}}/eval_{{kind}}/predictions"
        ),
    log:
        "logs/evaluate_active/{query}/seed{seed}/round{round}_{kind}.log",
    benchmark:
        "benchmarks/evaluate_active/{query}/seed{seed}/round{round}_{kind}.tsv"
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(4000),
        runtime=60,
        gpu=gpu_resource(),
    params:
        code=code_hash("evaluate"),
        task=TARGET,
        model=input_dir("model"),
        data=input_dir("manifest"),
        out=output_dir("metrics"),
        step=get_active_eval_step,
        settings=get_active_eval_settings,
    shell:
        "python -m stages.evaluate --model {params.model:q} --task {params.task} --data {params.data:q}"
        " --out {params.out:q} --method assft_{wildcards.query} --step {params.step}"
        " --settings {params.settings:q} > {log} 2>&1"
