# The embedded demo: synthetic phantoms in MSD layout, made only when demo.enabled is set.


if config["demo"]["enabled"]:

    rule make_demo_data:
        output:
            datasets=expand(
                "{out}/{dataset}/dataset.json",
                out=config["demo"]["out"],
                dataset=DEMO_DATASETS,
            ),
            record=f"{config['demo']['out']}/synth.json",
        log:
            "logs/synth/synth.log",
        benchmark:
            "benchmarks/synth/synth.tsv"
        conda:
            "../../envs/segadapt.yaml"
        resources:
            mem_mb=memory_mb(2000),
            runtime=10,
        params:
            code=code_hash("synth"),
            out=output_dir("record"),
            settings=settings(
                {
                    k: v
                    for k, v in config["demo"].items()
                    if k not in ("enabled", "out")
                }
            ),
        shell:
            "python -m stages.synth --out {params.out:q} --settings {params.settings:q} > {log} 2>&1"
