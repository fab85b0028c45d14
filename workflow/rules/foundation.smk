# The foundation model M0: pre-trained by self-supervision on the pool, or imported from a checkpoint.

if config["foundation"]["checkpoint"]:

    rule import_foundation:
        input:
            checkpoint=config["foundation"]["checkpoint"],
            pool=(
                f"{RESULTS}/pool/manifest.parquet"
                if config["foundation"]["pool"]
                else []
            ),
        output:
            model=f"{FOUNDATION}/model.safetensors",
            spec=f"{FOUNDATION}/model.json",
            stats=f"{FOUNDATION}/feature_stats.safetensors",
        log:
            "logs/foundation/import.log",
        benchmark:
            "benchmarks/foundation/import.tsv"
        conda:
            "../../envs/segadapt.yaml"
        resources:
            mem_mb=memory_mb(4000),
            runtime=30,
        params:
            code=code_hash("import_checkpoint"),
            pool=get_import_pool_arg,
            settings=import_settings(),
            out=output_dir("model"),
        shell:
            "python -m stages.import_checkpoint --checkpoint {input.checkpoint:q} --out {params.out:q}"
            " {params.pool} --settings {params.settings:q} > {log} 2>&1"

else:

    rule pretrain_foundation:
        input:
            pool=f"{RESULTS}/pool/manifest.parquet",
            tasks_ready=ancient(f"{RESULTS}/data/ready.json"),
        output:
            model=f"{FOUNDATION}/model.safetensors",
            spec=f"{FOUNDATION}/model.json",
            stats=f"{FOUNDATION}/feature_stats.safetensors",
            log_table=f"{FOUNDATION}/pretrain_log.parquet",
        log:
            "logs/foundation/pretrain.log",
        benchmark:
            "benchmarks/foundation/pretrain.tsv"
        conda:
            "../../envs/segadapt.yaml"
        threads: 2
        resources:
            mem_mb=memory_mb(8000),
            runtime=240,
            gpu=gpu_resource(),
        params:
            code=code_hash("pretrain"),
            settings=foundation_settings(),
            pool=input_dir("pool"),
            out=output_dir("model"),
            work=f"{RESULTS}/work/foundation",
        shell:
            "python -m stages.pretrain --pool {params.pool:q} --out {params.out:q}"
            " --work {params.work:q} --settings {params.settings:q} > {log} 2>&1"
