# Helpers of rules/analysis.smk (included from there): which models the analyses compare, their
# settings and targets, decided from the method registry in common.smk (the config is checked by
# stages.core.config.validate_config). Kept apart from the rules so that each .smk holds either
# functions or rules (snakemake --lint).

ANALYSIS = f"{RESULTS}/analysis"
DRIFT = f"{ANALYSIS}/drift"
LANDSCAPE = f"{ANALYSIS}/landscape"
LANDSCAPE_CONFIG = config["analysis"]["landscape"]
# methods with per-step models whose loss on an `order` task can be mapped
LANDSCAPE_CANDIDATES = SEQUENTIAL + PARALLEL + MULTITASK


def landscape_plan():
    """(task, {method: step}) of the loss landscapes (the config was checked by validate_config).

    Sequential methods are mapped at `step` (default: the last), parallel methods at the task itself,
    multi-task methods with their `all` model; no methods when the analysis is off."""
    if not LANDSCAPE_CONFIG["enabled"] or not ORDER:
        return None, {}
    chosen = LANDSCAPE_CONFIG["methods"] or LANDSCAPE_CANDIDATES
    task = LANDSCAPE_CONFIG["task"] or ORDER[0]
    step = LANDSCAPE_CONFIG["step"] or ORDER[-1]
    steps = {
        m: "all" if m in MULTITASK else task if m in PARALLEL else step for m in chosen
    }
    return task, steps


LANDSCAPE_TASK, LANDSCAPE_STEPS = landscape_plan()


def landscape_methods():
    """The methods whose loss landscape is computed (none when switched off)."""
    return list(LANDSCAPE_STEPS)


def landscape_figures(dim):
    """The figure of one dimension, if asked for (as a list: empty when not)."""
    name = {1: "landscape_1d.png", 2: "landscape_2d.png"}[dim]
    return [f"{LANDSCAPE}/{{method}}/{name}"] if dim in LANDSCAPE_CONFIG["dims"] else []


def get_landscape_model_file(wildcards):
    step = LANDSCAPE_STEPS[wildcards.method]
    return f"{model_dir(wildcards.method, step)}/model.safetensors"


def get_landscape_manifest(wildcards):
    return f"{data_dir(LANDSCAPE_TASK)}/manifest.parquet"


def get_landscape_step(wildcards):
    return LANDSCAPE_STEPS[wildcards.method]


def landscape_settings():
    s = LANDSCAPE_CONFIG
    seed = s["seed"] if s["seed"] is not None else config["seed"]
    keys = ("dims", "points", "range", "cases", "batch_size")
    return settings(
        {
            **{k: s[k] for k in keys},
            "seed": seed,
            "patch_size": config["train"]["patch_size"],
            "device": config["device"],
            "dpi": config["summary"]["dpi"],
        }
    )


def drift_models():
    """Every evaluated (method, step), each method's steps in order; empty when switched off."""
    return evaluated_models() if config["analysis"]["drift"]["enabled"] else []


def get_drift_model_files():
    return [f"{model_dir(m, s)}/model.safetensors" for m, s in drift_models()]


def drift_model_args():
    """METHOD:STEP:FOLDER:START_FOLDER per model (START_FOLDER: where its training began)."""
    return shell_args(
        *(f"{m}:{s}:{model_dir(m, s)}:{start_model(m, s)}" for m, s in drift_models())
    )


def drift_settings():
    return settings({"dpi": config["summary"]["dpi"]})


def analysis_outputs():
    """The analysis files rule all asks for (empty when both analyses are off)."""
    outputs = []
    if drift_models():
        outputs += [
            f"{DRIFT}/{name}"
            for name in (
                "drift.parquet",
                "drift_blocks.parquet",
                "drift_blocks.png",
                "drift_layers.png",
                "drift_total.png",
            )
        ]
    for method in landscape_methods():
        outputs.append(f"{LANDSCAPE}/{method}/landscape.parquet")
        outputs += [
            f.format(method=method) for d in (1, 2) for f in landscape_figures(d)
        ]
    return outputs
