# The summary of every evaluation (tables, Markdown and HTML) and its figures; the files wrapped in
# report() make up `snakemake --report report.html`. Numbers are computed once in stages.aggregate;
# stages.plots only draws them.


rule aggregate_metrics:
    input:
        metrics=get_metrics_tables(),
        train_logs=get_train_logs(),
    output:
        metrics=f"{SUMMARY}/metrics.parquet",
        cases=f"{SUMMARY}/cases.parquet",
        summary=f"{SUMMARY}/summary.parquet",
        forgetting=f"{SUMMARY}/forgetting.parquet",
        bwt=f"{SUMMARY}/bwt.parquet",
        paired=f"{SUMMARY}/paired.parquet",
        forgetting_paired=f"{SUMMARY}/forgetting_paired.parquet",
        budget=f"{SUMMARY}/budget.parquet",
        training_logs=f"{SUMMARY}/training_logs.parquet",
        table=f"{SUMMARY}/summary.md",
        html=report(
            f"{SUMMARY}/summary.html",
            caption="../report/summary.rst",
            category="1. Summary tables",
        ),
    log:
        "logs/aggregate/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(2000),
        runtime=10,
    params:
        code=code_hash("aggregate"),
        out=output_dir("metrics"),
        train_logs=train_log_args(),
        settings=summary_settings(),
    shell:
        "python -m stages.aggregate --metrics {input.metrics:q} --train-logs {params.train_logs}"
        " --out {params.out:q} --settings {params.settings:q} > {log} 2>&1"


rule plot_summary:
    input:
        cases=f"{SUMMARY}/cases.parquet",
        forgetting=f"{SUMMARY}/forgetting.parquet",
        bwt=f"{SUMMARY}/bwt.parquet",
        budget=f"{SUMMARY}/budget.parquet",
        training_logs=f"{SUMMARY}/training_logs.parquet",
        predictions=get_overlay_predictions(),
        manifests=get_overlay_manifests(),
    output:
        dice=report(
            f"{PLOTS}/dice_boxplots.png",
            caption="../report/dice_boxplots.rst",
            category="2. Figures",
            subcategory="Dice per task",
        ),
        training=report(
            f"{PLOTS}/training_loss.png",
            caption="../report/training_loss.rst",
            category="3. Training",
            subcategory="Loss curves",
        ),
        forgetting=report(
            forgetting_figure(),
            caption="../report/forgetting.rst",
            category="2. Figures",
            subcategory="Forgetting",
        ),
        budget=report(
            budget_figure(),
            caption="../report/budget.rst",
            category="2. Figures",
            subcategory="Label budget",
        ),
        overlays=report(
            overlay_figures(),
            caption="../report/overlay.rst",
            category="2. Figures",
            subcategory="Best and worst cases",
        ),
    log:
        "logs/plots/plots.log",
    benchmark:
        "benchmarks/plots/plots.tsv"
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(2000),
        runtime=10,
    params:
        code=code_hash("plots"),
        summary=input_dir("cases"),
        out=output_dir("dice"),
        overlays=overlay_args(),
        settings=plot_settings(),
    shell:
        "python -m stages.plots --summary {params.summary:q} --out {params.out:q} --overlay {params.overlays}"
        " --settings {params.settings:q} > {log} 2>&1"
