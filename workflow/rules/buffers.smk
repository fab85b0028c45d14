# MedSeqFT's buffer of each task: MDS (lowest M0 SSL loss) or random (ablation).


rule select_buffer:
    input:
        scores=f"{RESULTS}/scores/{{task}}/ssl.parquet",
    output:
        f"{RESULTS}/buffers/{{selection}}/{{task}}.parquet",
    log:
        "logs/select_buffer/{selection}/{task}.log",
    benchmark:
        "benchmarks/select_buffer/{selection}/{task}.tsv"
    localrule: True
    conda:
        "../../envs/segadapt.yaml"
    resources:
        mem_mb=memory_mb(1000),
        runtime=5,
    params:
        code=code_hash("select_buffer"),
        settings=get_buffer_settings,
    shell:
        "python -m stages.select_buffer --scores {input.scores:q} --task {wildcards.task} --out {output:q}"
        " --settings {params.settings:q} > {log} 2>&1"
