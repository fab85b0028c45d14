# Helpers shared by the rule files: config validation, settings for each step, paths, input functions.
import json
import sys
from pathlib import Path

from stages.core.codehash import code_hash
from stages.core.config import validate_config
from stages.core.errors import InputError

try:
    validate_config(config, source="config")
except InputError as err:
    sys.exit(f"segadapt: error: {err}")


RESULTS = "results"
TASKS = {t["name"]: t for t in config["tasks"]}
ORDER = list(config["order"])
DEMO_DATASETS = ["organ_lesion", "paired_organs", "tubular", "unseen", "pool"]
METHODS = [m for m, s in config["methods"].items() if s["enabled"]]


wildcard_constraints:
    task="|".join(TASKS) or "__none__",
    step="|".join(TASKS) or "__none__",
    method="[a-z_]+",


def settings(obj):
    """Settings as canonical JSON: the rule passes it on the command line and Snakemake tracks it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def dataset_marker(path):
    """The file that stands for a dataset folder as a rule input (its dataset.json, or imagesTr/)."""
    p = Path(path)
    demo_root = Path(config["demo"]["out"])
    if config["demo"]["enabled"] and (p == demo_root or demo_root in p.parents):
        return str(p / "dataset.json")
    return str(p / "dataset.json") if (p / "dataset.json").is_file() else str(p / "imagesTr")


def get_task_dataset(wildcards):
    return dataset_marker(TASKS[wildcards.task]["dataset"])


def get_task_dataset_path(wildcards):
    return TASKS[wildcards.task]["dataset"]


def get_task_preprocess_settings(wildcards):
    return preprocess_settings(wildcards.task)


def get_pool_dataset(wildcards):
    return dataset_marker(config["foundation"]["pool"])


def preprocess_settings(task=None):
    common = {
        "seed": config["seed"],
        "split": config["preprocess"]["split"],
        "target_spacing": config["preprocess"]["target_spacing"],
        "normalisation": config["preprocess"]["normalisation"],
    }
    if task is None:
        return settings({**common, "labelled": False, "labels": None})
    return settings({**common, "labelled": True, "labels": TASKS[task]["labels"]})


def foundation_settings():
    f = config["foundation"]
    keys = ("arch", "in_channels", "arch_kwargs", "ssl", "pretrain")
    return settings({**{k: f[k] for k in keys}, "seed": config["seed"], "device": config["device"]})


def import_settings():
    f = config["foundation"]
    keys = ("arch", "in_channels", "arch_kwargs", "ssl", "prefix_map")
    return settings({**{k: f[k] for k in keys}, "format": f["import_format"], "device": config["device"]})


def train_settings():
    return settings(
        {
            **config["train"],
            "overlap": config["inference"]["overlap"],
            "seed": config["seed"],
            "device": config["device"],
        }
    )


def inference_settings():
    return settings(
        {
            **config["inference"],
            "patch_size": config["train"]["patch_size"],
            "device": config["device"],
        }
    )


def gpu_resource():
    return 1 if config["device"] == "cuda" else 0


def get_metrics_tables():
    tables = []
    for method in METHODS:
        # parallel methods: each task's model is evaluated on its own task
        tables += [f"{RESULTS}/eval/{method}/{t}/{t}/metrics.parquet" for t in ORDER]
    return tables


def get_final_outputs():
    outputs = [f"{RESULTS}/summary/metrics.parquet", f"{RESULTS}/summary/summary.md"]
    outputs += [f"{RESULTS}/scores/{t}/ssl.parquet" for t in TASKS]
    outputs += [f"{RESULTS}/scores/{t}/features.parquet" for t in TASKS]
    return outputs
