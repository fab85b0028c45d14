"""Load the run configuration, fill defaults from the JSON Schema, and refuse a bad one by key name."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stages.core.errors import InputError
from stages.core.methods import METHODS, enabled_methods
from stages.core.split import split_counts

__all__ = ["SCHEMA_PATH", "load_config", "validate_config"]

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _validator_with_defaults(schema: Mapping[str, Any]) -> Any:
    """A Draft 2020-12 validator that also writes each property's default (jsonschema FAQ recipe)."""
    from jsonschema import Draft202012Validator, validators

    base_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base_properties(validator, properties, instance, schema)

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(schema)


#: ``assft`` keys that moved under ``assft.options.<strategy>`` (issue 17): refused with their new place
MOVED_ASSFT_KEYS = {
    "weight": "assft.options.dkd_asd.weight",
    "fg_share": "assft.options.fg_random.share",
    "mc_passes": "assft.options.mc_dropout.passes",
    "mc_dropout": "assft.options.mc_dropout.dropout",
    "mc_score": "assft.options.mc_dropout.measure (entropy is now monailabel, bald mutual_information)",
    "coreset_metric": "assft.options.coreset.metric",
}


def _refuse_moved_keys(config: Mapping[str, Any], source: str) -> None:
    assft = config.get("assft")
    moved = sorted(set(assft) & set(MOVED_ASSFT_KEYS)) if isinstance(assft, Mapping) else []
    if moved:
        raise InputError(f"{source}: assft.{moved[0]}", f"has moved: set {MOVED_ASSFT_KEYS[moved[0]]}")


def _key(path: Any) -> str:
    parts: list[str] = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts) or "(top level)"


def validate_config(
    config: dict[str, Any], source: str = "config", schema_path: Path = SCHEMA_PATH, check_paths: bool = True
) -> dict[str, Any]:
    """Validate ``config`` in place (defaults filled) and return it.

    Args:
        config: the parsed configuration.
        source: what to call the configuration in messages (its file name).
        schema_path: the JSON Schema (YAML) to validate against.
        check_paths: also check that dataset folders exist (demo folders are exempt: the pipeline
            makes them).

    Raises:
        InputError: naming ``<source>: <key>`` and the problem, for the first problem found.
    """
    _refuse_moved_keys(config, source)
    schema = yaml.safe_load(schema_path.read_text())
    # defaults of nested objects are filled as the validator descends, so validate twice: the first
    # pass creates the defaulted sub-objects, the second fills their own defaults and checks them
    validator = _validator_with_defaults(schema)
    for _ in range(2):
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            message = err.message
            if err.validator == "additionalProperties":
                message = f"unknown key ({err.message})"
            raise InputError(f"{source}: {_key(err.absolute_path)}", message)

    _refuse_non_finite(config, source)
    names = [t["name"] for t in config["tasks"]]
    for i, name in enumerate(names):
        if name in RESERVED_TASK_NAMES:
            raise InputError(
                f"{source}: tasks[{i}].name", f"{name!r} is reserved (the multi-task step's name); rename the task"
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{source}: tasks", f"duplicate task names {dupes}")
    for key in ("order", "unseen"):
        unknown = [n for n in config[key] if n not in names]
        if unknown:
            raise InputError(f"{source}: {key}", f"names no task in `tasks`: {unknown}")
    if len(set(config["order"])) != len(config["order"]):
        raise InputError(f"{source}: order", "a task appears twice")
    both = sorted(set(config["order"]) & set(config["unseen"]))
    if both:
        raise InputError(f"{source}: unseen", f"tasks {both} are also in `order`; an unseen task must be held back")
    if config["seeds"] is not None and config["seed"] not in config["seeds"]:
        # the run of `seed` keeps the one-seed layout and stands for its method in logs, overlays, analyses
        raise InputError(f"{source}: seeds", f"must include `seed` ({config['seed']}), got {config['seeds']}")
    split = config["preprocess"]["split"]
    if split["val"] + split["test"] >= 1:
        raise InputError(f"{source}: preprocess.split", "val + test must leave cases for training (sum < 1)")
    if check_paths:
        datasets = [(f"tasks[{i}].dataset", t["dataset"]) for i, t in enumerate(config["tasks"])]
        if config["foundation"]["pool"]:
            datasets.append(("foundation.pool", config["foundation"]["pool"]))
        for key, path in datasets:
            if _made_by_demo(path, config):
                continue
            p = Path(path).resolve()
            if not (p / "dataset.json").is_file() and not (p / "imagesTr").is_dir():
                raise InputError(
                    f"{source}: {key}", f"{path!r} is not an MSD dataset folder (no dataset.json, no imagesTr/)"
                )
        for i, task in enumerate(config["tasks"]):
            _check_task_dataset(config, i, task, source)
        ckpt = config["foundation"]["checkpoint"]
        if ckpt and not Path(ckpt).is_file():
            raise InputError(f"{source}: foundation.checkpoint", f"{ckpt!r} does not exist")
    if not config["foundation"]["checkpoint"] and not config["foundation"]["pool"]:
        raise InputError(f"{source}: foundation", "set `pool` (to pre-train M0) or `checkpoint` (to import it)")
    assft = config["assft"]
    if assft["target"] is not None and assft["target"] not in names:
        raise InputError(f"{source}: assft.target", f"names no task in `tasks`: {assft['target']!r}")
    if config["methods"]["assft"]["enabled"] and assft["target"] is None and not config["unseen"]:
        raise InputError(f"{source}: assft.target", "set a target task (or list one in `unseen`) for ASSFT")
    container = config["container"]
    if container["engine"] != "native" and not container["image"]:
        raise InputError(f"{source}: container.image", f"engine {container['engine']!r} needs an image")
    if config["methods"]["assft"]["enabled"] and check_paths:
        _check_assft_budget(config, source)
    if not config["order"]:
        config["order"] = [n for n in names if n not in config["unseen"]]
    _check_landscape(config, source)
    return config


#: chains whose models have per-step models on the `order` tasks, whose loss landscape can be mapped
LANDSCAPE_CHAINS = ("sequential", "parallel", "multitask")


def _check_landscape(config: Mapping[str, Any], source: str) -> None:
    """The loss-landscape analysis names enabled methods, a task and a step of `order`, in a possible order.

    (Checked here, not in the workflow, so that Snakemake and :func:`validate_config` refuse the same
    configs.)
    """
    landscape = config["analysis"]["landscape"]
    order = list(config["order"])
    if not landscape["enabled"] or not order:
        return
    key = f"{source}: analysis.landscape"
    candidates = [m for m in enabled_methods(config) if METHODS[m].chain in LANDSCAPE_CHAINS]
    chosen = landscape["methods"] or candidates
    off = [m for m in chosen if m not in candidates]
    if off:
        raise InputError(f"{key}.methods", f"{off} are not enabled (enabled: {candidates})")
    task = landscape["task"] or order[0]
    if task not in order:
        raise InputError(f"{key}.task", f"{task!r} is not a task of `order` {order}")
    step = landscape["step"] or order[-1]
    if step not in order:
        raise InputError(f"{key}.step", f"{step!r} is not a step of `order` {order}")
    if order.index(step) < order.index(task) and any(METHODS[m].chain == "sequential" for m in chosen):
        raise InputError(f"{key}.step", f"the model of step {step!r} has not learned task {task!r} yet")


#: task names the workflow uses for itself (``all`` is the multi-task step of the BWT matrix)
RESERVED_TASK_NAMES = frozenset({"all"})


def _refuse_non_finite(node: Any, source: str, path: tuple[Any, ...] = ()) -> None:
    """Refuse NaN/Inf anywhere: JSON Schema's bounds let ``.nan`` through (every comparison is false)."""
    if isinstance(node, float) and not math.isfinite(node):
        raise InputError(f"{source}: {_key(path)}", f"must be a finite number, got {node!r}")
    if isinstance(node, Mapping):
        for key, value in node.items():
            _refuse_non_finite(value, source, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_non_finite(value, source, (*path, index))


def _check_task_dataset(config: Mapping[str, Any], index: int, task: Mapping[str, Any], source: str) -> None:
    """Before any job: the task's labels are declared, its entries stay in its folder, its split has test cases."""
    split = config["preprocess"]["split"]
    key = f"{source}: tasks[{index}]"
    if _made_by_demo(task["dataset"], config):
        n, origin = int(config["demo"]["cases_per_task"]), "demo.cases_per_task"
    else:
        from stages.core.msd import OUTSIDE_FOLDER, read_dataset  # nibabel only where a real dataset is read

        dataset = read_dataset(Path(task["dataset"]), labelled=True)
        outside = [problem for _, problem in dataset.problems if OUTSIDE_FOLDER in problem]
        if outside:
            raise InputError(f"{task['dataset']}/dataset.json", "; ".join(outside))
        wanted = task.get("labels")
        if wanted and dataset.labels_declared:
            unknown = [v for v in wanted if v not in dataset.labels or v == 0]
            if unknown:
                declared = {k: v for k, v in sorted(dataset.labels.items()) if k != 0}
                raise InputError(
                    f"{key}.labels",
                    f"label values {unknown} are not declared by {task['dataset']}/dataset.json "
                    f"(its labels: {declared})",
                )
        n, origin = len(dataset.cases), task["dataset"]
    n, origin = _without_pool_holdout(config, task["dataset"], n, origin)
    _n_train, _n_val, n_test = split_counts(n, split["val"], split["test"])
    if n_test == 0:
        raise InputError(
            f"{source}: preprocess.split.test",
            f"task {task['name']!r} has {n} cases ({origin}): a test fraction of {split['test']} leaves it no "
            f"test case, so it could not be evaluated; raise preprocess.split.test or add cases",
        )


def _without_pool_holdout(config: Mapping[str, Any], dataset: str, n: int, origin: str) -> tuple[int, str]:
    """The cases a task keeps when M0's pool holds back part of the same dataset (foundation.pool_holdout)."""
    f = config["foundation"]
    fraction = f.get("pool_holdout") or 0
    if not fraction or not f["pool"] or Path(f["pool"]).resolve() != Path(dataset).resolve():
        return n, origin
    held = math.floor(fraction * n + 0.5)  # preprocess.held_out_cases' rounding
    return n - held, f"{origin}, less {held} held back by foundation.pool_holdout"


def _made_by_demo(path: str, config: Mapping[str, Any]) -> bool:
    """True if ``path`` lies in the demo's output folder (the pipeline makes it; it need not exist yet)."""
    demo = config["demo"]
    if not demo["enabled"]:
        return False
    p, root = Path(path).resolve(), Path(demo["out"]).resolve()
    return p == root or root in p.parents


def _count_cases(dataset: str, config: Mapping[str, Any]) -> tuple[int, str]:
    """How many labelled cases a task's dataset holds, and where that number comes from."""
    if _made_by_demo(dataset, config):
        return int(config["demo"]["cases_per_task"]), "demo.cases_per_task"
    from stages.core.msd import read_dataset  # nibabel only where a real dataset is counted

    # read_dataset lists the image/label pairs without opening them; their problems are
    # preprocessing's to report, with every file named
    return len(read_dataset(Path(dataset), labelled=True).cases), f"{dataset}"


def _check_assft_budget(config: Mapping[str, Any], source: str) -> None:
    """Refuse ASSFT rounds x budget beyond the target's training split before any job starts.

    Otherwise the shortfall shows only in a late query round, after M0's pre-training and the
    earlier rounds' fine-tuning (docs/methods.md §2: every round labels ``budget`` new training cases).
    """
    assft = config["assft"]
    target = assft["target"] or config["unseen"][0]
    dataset = next(t["dataset"] for t in config["tasks"] if t["name"] == target)
    n, origin = _without_pool_holdout(config, dataset, *_count_cases(dataset, config))
    split = config["preprocess"]["split"]
    n_train = split_counts(n, split["val"], split["test"])[0]
    wanted = assft["rounds"] * assft["budget"]
    if wanted > n_train:
        raise InputError(
            f"{source}: assft.budget",
            f"{assft['rounds']} rounds x {assft['budget']} labels = {wanted} cases, but the target task "
            f"{target!r} has {n_train} training cases ({n} in {origin}, split val {split['val']} / test "
            f"{split['test']}): lower assft.budget or assft.rounds",
        )


def load_config(path: str | Path, check_paths: bool = True) -> dict[str, Any]:
    """Read a YAML configuration file and validate it (see :func:`validate_config`)."""
    p = Path(path)
    try:
        config = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(p, f"cannot read the configuration: {err}") from err
    if not isinstance(config, dict):
        raise InputError(p, "the configuration must be a mapping of keys to values")
    return validate_config(config, source=p.name, check_paths=check_paths)
