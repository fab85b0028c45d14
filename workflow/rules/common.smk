# Helpers shared by all .smk files - config validation, the method registry, settings for each step,
# and input functions. Rules only wire files; the science is in the stages package.
import json
import os
import shlex
import sys
from pathlib import Path

# The code hash in each rule's params must be the hash of the code its job runs. This repository's
# `stages` comes first here, whatever else is installed (a regular install, or an editable install
# of another clone, would be hashed instead), and the jobs get it first on their PYTHONPATH too (a job
# runs `python -m stages.<step>` in the working folder, which need not be this repository).
REPO = str(Path(workflow.basedir).resolve().parent)
sys.path.insert(0, REPO)
# (through a name: PYTHONPATH is optional here, not an envvar the workflow requires)
_ENV = os.environ
_ENV["PYTHONPATH"] = os.pathsep.join(
    [REPO]
    + [p for p in _ENV.get("PYTHONPATH", "").split(os.pathsep) if p and p != REPO]
)

from stages.core import methods as method_registry
from stages.core.codehash import code_hash
from stages.core.config import validate_config
from stages.core.container import shell_prefix
from stages.core.errors import InputError

try:
    validate_config(config, source="config")
except InputError as err:
    sys.exit(f"segadapt: error: {err}")


RESULTS = "results"
FOUNDATION = f"{RESULTS}/foundation"
TASKS = {t["name"]: t for t in config["tasks"]}
ORDER = list(config["order"])
UNSEEN = list(config["unseen"])
DEMO_DATASETS = ["organ_lesion", "paired_organs", "tubular", "unseen", "pool"]
# The method registry (stages/core/methods.py, docs/methods.md §1): every list below is derived from its rows.
ENABLED = method_registry.enabled_methods(config)
METHOD = method_registry.METHODS
KGRFT = [m for m in ENABLED if METHOD[m].kgrft]
SEQUENTIAL = method_registry.names("sequential", ENABLED)
PARALLEL = method_registry.names("parallel", ENABLED)
MULTITASK = method_registry.names("multitask", ENABLED)
TRANSFER = method_registry.names("transfer", ENABLED)
# methods whose every step is one training job of the model itself (train_full_ft): full fine-tuning,
# EWC, LwF
SINGLE_JOB = [
    m
    for m in SEQUENTIAL + PARALLEL + TRANSFER
    if METHOD[m].recipe in ("finetune", "ewc", "lwf")
]
# methods whose step ends with a LoRA adapter merged into its base (train_retention + merge_adapter)
LORA = [m for m in ENABLED if METHOD[m].merged]
BUFFER_STRATEGIES = sorted({METHOD[m].buffer for m in KGRFT if METHOD[m].buffer})
EWC = [m for m in SEQUENTIAL if METHOD[m].recipe == "ewc"]

# Training seeds (config `seeds`; none = the one `seed`): every training run of every method is repeated
# per seed. A run of `seed` keeps the one-seed layout runs/{method}/{step}; another seed s is the run
# `{method}/seed{s}` (runs/{method}/seed{s}/{step}, and likewise under eval/, work/, logs/), so the
# rules' {method} wildcard names a run and split_run() gives back the method and its seed.
BASE_SEED = config["seed"]
SEEDS = list(config["seeds"] or [BASE_SEED])


def run_name(method, seed=None):
    """The run of ``method`` under training seed ``seed`` (None = the base seed): its path level(s)."""
    return method_registry.run_name(method, seed, BASE_SEED)


def split_run(run):
    """(method, training seed) of a run name (see run_name)."""
    return method_registry.split_run(run, BASE_SEED)


def runs_of(methods):
    """Every run (method x training seed) of these methods."""
    return [run_name(m, s) for m in methods for s in SEEDS]


# ASSFT (docs/methods.md §2): one chain of query rounds per strategy and seed on the target task;
# semi-supervised variants after the last round for the ASSFT strategy itself (dkd_asd).
ASSFT = config["assft"]
TARGET = ASSFT["target"] or (UNSEEN[0] if UNSEEN else None)
ASSFT_ON = "assft" in ENABLED and TARGET is not None
ACTIVE = f"{RESULTS}/active/{TARGET}"
# a chain's seed seeds its queries and its training: every strategy runs under the training seeds, the
# random ones (plain and foreground-aware) also under their query seeds
RANDOM_QUERIES = ("random", "fg_random")
ACTIVE_RUNS = [
    (q, seed)
    for q in ASSFT["strategies"]
    for seed in (
        sorted(set(ASSFT["random_seeds"]) | set(SEEDS))
        if q in RANDOM_QUERIES
        else SEEDS
    )
]
LAST_ROUND = ASSFT["rounds"] - 1
SEMI = [m for m in ASSFT["semi"] if m != "none"]
# the equal-steps control of the semi-supervised models: the round model fine-tuned as long again on
# the labelled cases only (model_continue, evaluated as round<r>+continue)
CONTROL = ["continue"] if ASSFT["equal_steps_control"] and SEMI else []


def shell_args(*args):
    """``args`` as one shell-quoted string: a flag and a path that may hold spaces, quotes or ``$(...)``."""
    return " ".join(shlex.quote(str(a)) for a in args)


def alternatives(names):
    """A wildcard pattern matching exactly these names (or nothing)."""
    return "|".join(names) or "__none__"


def settings(obj):
    """Settings as canonical JSON: the rule passes it on the command line and Snakemake tracks it."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def dataset_marker(path):
    """The file that stands for a dataset folder as a rule input (its dataset.json, or imagesTr/)."""
    p = Path(path)
    demo_root = Path(config["demo"]["out"])
    if config["demo"]["enabled"] and (p == demo_root or demo_root in p.parents):
        return str(p / "dataset.json")
    return (
        str(p / "dataset.json")
        if (p / "dataset.json").is_file()
        else str(p / "imagesTr")
    )


def data_dir(task):
    return f"{RESULTS}/data/{task}"


def model_dir(method, step, seed=None):
    return f"{RESULTS}/runs/{run_name(method, seed)}/{step}"


def as_list(files):
    """A named input as a list (Snakemake gives a single file as a plain string)."""
    return [files] if isinstance(files, str) else list(files)


def output_dir(name):
    """A params function: the folder of the named output file (no hard-coded prefix)."""

    def get(wildcards, output):
        return str(Path(getattr(output, name)).parent)

    return get


def input_dir(name):
    """A params function: the folder of the named input file (no hard-coded prefix)."""

    def get(wildcards, input):
        return str(Path(getattr(input, name)).parent)

    return get


def input_dirs(name):
    """A params function: the folders of the named input files, each shell-quoted, space-separated."""

    def get(wildcards, input):
        return shell_args(*(Path(f).parent for f in as_list(getattr(input, name))))

    return get


def outside_workdir(path):
    """True if ``path`` (relative paths are inside) lies outside the working folder."""
    p = Path(path).resolve()
    here = Path.cwd().resolve()
    return p != here and here not in p.parents


def docker_mounts():
    """Folders the steps read (or, for an inbox, write) outside the working folder."""
    c = config["container"]
    ckpt = config["foundation"]["checkpoint"]
    reads = [t["dataset"] for t in config["tasks"]] + [
        config["foundation"]["pool"],
        ckpt and str(Path(ckpt).parent),
        *c["mounts"],
    ]
    mounts = [str(Path(p).resolve()) for p in reads if p and outside_workdir(p)]
    if ASSFT["annotation"] == "inbox" and outside_workdir(ASSFT["inbox"]):
        mounts.append(
            f"{Path(ASSFT['inbox']).resolve()}:rw"
        )  # the request list is written there
    return mounts


# ---- input functions -------------------------------------------------------------------------------
def get_task_dataset(wildcards):
    return dataset_marker(TASKS[wildcards.task]["dataset"])


def get_task_preprocess_settings(wildcards):
    return preprocess_settings(wildcards.task)


def get_pool_dataset(wildcards):
    return dataset_marker(config["foundation"]["pool"])


def get_import_pool_arg(wildcards, input):
    pool = as_list(input.pool)
    return shell_args("--pool", Path(pool[0]).parent) if pool else ""


def previous_model(method, step, seed=None):
    """M_{t-1} of a sequential method (M0 before the first task), in the same seed's chain."""
    i = ORDER.index(step)
    return FOUNDATION if i == 0 else model_dir(method, ORDER[i - 1], seed)


def start_model(method, step, seed=None):
    """The model a step's training starts from (a run of ``seed`` starts from that seed's models)."""
    kind = method_registry.start_kind(method)
    if kind == "previous":
        return previous_model(method, step, seed)
    if kind == "medseqft_last":
        return model_dir("medseqft", ORDER[-1], seed)
    return FOUNDATION  # parallel, multi-task, transfer from M0


def get_start_model_file(wildcards):
    method, seed = split_run(wildcards.method)
    return f"{start_model(method, wildcards.step, seed)}/model.safetensors"


def get_step_manifest(wildcards):
    return f"{data_dir(wildcards.step)}/manifest.parquet"


def buffer_tables(method, step):
    """B_1 .. B_t of a K&G RFT method at step t (none for the no-buffer ablation and for parallel LoRA)."""
    strategy = METHOD[method].buffer if method in KGRFT else None
    if not strategy:
        return []
    return [
        f"{RESULTS}/buffers/{strategy}/{t}.parquet"
        for t in ORDER[: ORDER.index(step) + 1]
    ]


def get_buffer_tables(wildcards):
    return buffer_tables(split_run(wildcards.method)[0], wildcards.step)


def get_buffer_manifests(wildcards):
    return [
        f"{data_dir(Path(t).stem)}/manifest.parquet"
        for t in buffer_tables(split_run(wildcards.method)[0], wildcards.step)
    ]


def get_buffer_args(wildcards, input):
    """BUFFER_PARQUET:DATA_FOLDER pairs, in task order."""
    return shell_args(
        *(
            f"{table}:{Path(manifest).parent}"
            for table, manifest in zip(input.buffers, input.buffer_data)
        )
    )


def reused_teacher(method, step, seed=None):
    """Parallel FT's model of the first task when it stands in for this K&G RFT method's teacher there.

    With medseqft.reuse_parallel_teacher, the first step's teacher (full FT of M0 on the first task with
    the train settings) is the same job as parallel FT's first step, bit for bit: it is trained once.
    """
    if (
        config["medseqft"]["reuse_parallel_teacher"]
        and method in KGRFT
        and "parallel_ft" in PARALLEL
        and ORDER.index(step) == 0
    ):
        return model_dir("parallel_ft", step, seed)
    return None


def reused_first_step(method, step, seed=None):
    """Parallel FT's first-step model when it is this sequential method's first step (reuse_first_steps).

    Sequential FT, EWC and LwF start with plain full FT of M0 on the first task: with the same step
    factor that is the parallel method's first job, bit for bit, so it is trained once and copied.
    """
    row = METHOD[method]
    twin = next(
        (
            m
            for m in PARALLEL
            if METHOD[m].recipe == "finetune"
            and METHOD[m].step_factor == row.step_factor
        ),
        None,
    )
    if (
        config["reuse_first_steps"]
        and row.plain_first_step
        and twin
        and ORDER.index(step) == 0
    ):
        return model_dir(twin, step, seed)
    return None


REUSED_FIRST = [m for m in SEQUENTIAL if reused_first_step(m, ORDER[0]) is not None]


def get_reused_first_step_files(wildcards):
    method, seed = split_run(wildcards.method)
    source = reused_first_step(method, wildcards.step, seed)
    return [f"{source}/{name}" for name in method_registry.MODEL_FILES]


def get_teacher_file(wildcards):
    method, seed = split_run(wildcards.method)
    if method in KGRFT:
        reused = reused_teacher(method, wildcards.step, seed)
        folder = reused or f"{model_dir(method, wildcards.step, seed)}/teacher"
        return f"{folder}/model.safetensors"
    return []


def get_recipe(wildcards):
    """The stages.train recipe of a (single-job) training step: the method's row says."""
    return METHOD[split_run(wildcards.method)[0]].recipe


def get_fisher_file(wildcards):
    """Online EWC: the accumulated Fisher of the chain's previous step (none at the first step)."""
    method, seed = split_run(wildcards.method)
    i = ORDER.index(wildcards.step) if wildcards.step in ORDER else 0
    if method not in EWC or i == 0:
        return []
    return f"{model_dir(method, ORDER[i - 1], seed)}/fisher/fisher.safetensors"


def get_fisher_arg(wildcards, input):
    fisher = as_list(input.fisher)
    return shell_args("--fisher", Path(fisher[0]).parent) if fisher else ""


def get_previous_fisher_arg(wildcards, input):
    previous = as_list(input.previous)
    return shell_args("--previous", Path(previous[0]).parent) if previous else ""


def get_fisher_settings(wildcards):
    """The Fisher estimate's settings: `ewc` (gamma, fisher_batches), the training patches and the
    run's training seed."""
    t = config["train"]
    return settings(
        {
            "gamma": config["ewc"]["gamma"],
            "fisher_batches": config["ewc"]["fisher_batches"],
            "patch_size": t["patch_size"],
            "batch_size": t["batch_size"],
            "fg_ratio": t["fg_ratio"],
            "seed": split_run(wildcards.method)[1],
            "device": config["device"],
        }
    )


def get_teacher_arg(wildcards, input):
    teacher = as_list(input.teacher)
    return shell_args("--teacher", Path(teacher[0]).parent) if teacher else ""


def eval_tasks(method, step):
    """The tasks a (method, step) model is evaluated on: for sequential methods every task so far."""
    return method_registry.eval_tasks(method, step, ORDER)


def get_eval_manifests(wildcards):
    return [
        f"{data_dir(t)}/manifest.parquet"
        for t in eval_tasks(split_run(wildcards.method)[0], wildcards.step)
    ]


def get_eval_task_names(wildcards):
    return " ".join(eval_tasks(split_run(wildcards.method)[0], wildcards.step))


def get_eval_method(wildcards):
    """The method name an evaluation records (its training seed goes in the metrics' seed column)."""
    return split_run(wildcards.method)[0]


def get_eval_settings(wildcards):
    return evaluate_settings(split_run(wildcards.method)[1])


def active_dir(wildcards):
    return f"{ACTIVE}/{wildcards.query}/seed{wildcards.seed}"


def active_start_model():
    """The model every ASSFT round fine-tunes from (M0, or MedSeqFT's M_n)."""
    return (
        model_dir("medseqft", ORDER[-1]) if ASSFT["start"] == "medseqft" else FOUNDATION
    )


def get_previous_labelled(wildcards):
    r = int(wildcards.round)
    return (
        []
        if r == 0
        else [f"{active_dir(wildcards)}/round{r - 1}/labelled/labelled.parquet"]
    )


def get_previous_round_model(wildcards):
    r = int(wildcards.round)
    return (
        []
        if r == 0
        else [f"{active_dir(wildcards)}/round{r - 1}/model_l/model.safetensors"]
    )


def get_labelled_arg(wildcards, input):
    previous = as_list(input.previous)
    return shell_args("--labelled", previous[0]) if previous else ""


def get_previous_arg(wildcards, input):
    previous = as_list(input.previous)
    return shell_args("--previous", previous[0]) if previous else ""


def get_pseudo_arg(wildcards, input):
    return shell_args("--pseudo", Path(input.pseudo).parent)


def get_round_model_arg(wildcards, input):
    model = as_list(input.model)
    return shell_args("--model", Path(model[0]).parent) if model else ""


def get_query_settings(wildcards):
    """A query job's settings; the strategy's options pass through from assft.options.<strategy>."""
    return settings(
        {
            "strategy": wildcards.query,
            "budget": ASSFT["budget"],
            "seed": int(wildcards.seed),
            "options": ASSFT["options"].get(wildcards.query, {}),
            "dkd_knowledge": ASSFT["dkd_knowledge"],
            "dkd_winsor_quantile": ASSFT["dkd_winsor_quantile"],
            "patch_size": config["train"]["patch_size"],
            "overlap": config["inference"]["overlap"],
            "sw_batch_size": config["inference"]["sw_batch_size"],
            "device": config["device"],
        }
    )


def get_inbox_arg(wildcards):
    return (
        shell_args("--inbox", ASSFT["inbox"]) if ASSFT["annotation"] == "inbox" else ""
    )


def get_pseudo_settings(wildcards):
    return settings(
        {
            "mode": wildcards.semi,
            "q": ASSFT["q"],
            "patch_size": config["train"]["patch_size"],
            "overlap": config["inference"]["overlap"],
            "sw_batch_size": config["inference"]["sw_batch_size"],
            "device": config["device"],
        }
    )


def semi_settings(seed=None):
    return settings({**train_dict(seed), "pseudo_weight": ASSFT["pseudo_weight"]})


def get_active_eval_step(wildcards):
    return method_registry.active_step(wildcards.round, wildcards.kind)


def get_active_eval_method(wildcards):
    return method_registry.active_method(wildcards.query)


def get_active_eval_settings(wildcards):
    return evaluate_settings(int(wildcards.seed))


def get_chain_train_settings(wildcards):
    """A chain's fine-tuning (rounds and the equal-steps control) trains under the chain's seed."""
    return train_settings(int(wildcards.seed))


def get_semi_settings(wildcards):
    return semi_settings(int(wildcards.seed))


def active_eval_tables():
    if not ASSFT_ON:
        return []
    tables = [
        f"{ACTIVE}/{q}/seed{s}/round{r}/eval_model_l/metrics.parquet"
        for q, s in ACTIVE_RUNS
        for r in range(ASSFT["rounds"])
    ]
    tables += [
        f"{ACTIVE}/{q}/seed{s}/round{LAST_ROUND}/eval_model_{m}/metrics.parquet"
        for q, s in ACTIVE_RUNS
        if q == "dkd_asd"
        for m in SEMI + CONTROL
    ]
    return tables


# ---- settings of each step -------------------------------------------------------------------------
def preprocess_settings(task=None):
    common = {
        "seed": config["seed"],
        "split": config["preprocess"]["split"],
        "target_spacing": config["preprocess"]["target_spacing"],
        "normalisation": config["preprocess"]["normalisation"],
        "max_voxels": config["preprocess"]["max_voxels"],
    }
    holdout = pool_holdout(task)
    if (
        holdout is not None
    ):  # only then, so that other configs' settings (and hashes) stay as they were
        common["holdout"] = holdout
    if task is None:
        return settings({**common, "labelled": False, "labels": None})
    return settings({**common, "labelled": True, "labels": TASKS[task]["labels"]})


def pool_holdout(task=None):
    """foundation.pool_holdout as the preprocess step's `holdout`, for the pool (task None: keep the held
    cases) and for each task on the pool's dataset (drop them); None where nothing is held back.
    """
    f = config["foundation"]
    fraction = f["pool_holdout"]
    if not fraction or not f["pool"]:
        return None
    pool = Path(f["pool"]).resolve()
    same = [t for t, spec in TASKS.items() if Path(spec["dataset"]).resolve() == pool]
    if task is None:
        return {"fraction": fraction, "keep": "held"} if same else None
    return {"fraction": fraction, "keep": "rest"} if task in same else None


def foundation_settings():
    f = config["foundation"]
    keys = ("arch", "in_channels", "arch_kwargs", "ssl", "pretrain")
    return settings(
        {**{k: f[k] for k in keys}, "seed": config["seed"], "device": config["device"]}
    )


def import_settings():
    f = config["foundation"]
    keys = ("arch", "in_channels", "arch_kwargs", "ssl", "prefix_map")
    return settings(
        {
            **{k: f[k] for k in keys},
            "format": f["import_format"],
            "device": config["device"],
        }
    )


def train_threads():
    """Threads of a training job (Snakemake gives fewer when --cores is smaller); not a setting: not hashed."""
    return config["train"]["threads"]


def train_dict(seed=None):
    return {
        **{k: v for k, v in config["train"].items() if k != "threads"},
        "overlap": config["inference"]["overlap"],
        "seed": BASE_SEED if seed is None else int(seed),
        "device": config["device"],
    }


def train_settings(seed=None, steps_factor=1):
    s = train_dict(seed)
    if steps_factor != 1:
        s["steps"] = steps_factor * s["steps"]
    return settings(s)


def get_train_settings(wildcards):
    """A training run's settings: its seed, and the step count of a compute-matched baseline."""
    method, seed = split_run(wildcards.method)
    s = json.loads(train_settings(seed, METHOD[method].step_factor))
    recipe = METHOD[method].recipe
    if recipe in ("ewc", "lwf"):
        s[recipe] = config[recipe]
        s["grad_log_every"] = config["medseqft"]["grad_log_every"]
    return settings(s)


def get_retention_settings(wildcards):
    m = config["medseqft"]
    method, seed = split_run(wildcards.method)
    s = {
        **train_dict(seed),
        "lora": {**m["lora"], "enabled": METHOD[method].lora},
        "kd_kind": m["kd_kind"],
        "kd_temperature": m["kd_temperature"],
        "kd_mask": m["kd_mask"],
        "kd_dilation": m["kd_dilation"],
        "kd_background_share": m["kd_background_share"],
        "retention_levels": m["retention_levels"],
        "retention_scale": m["retention_scale"],
        # the terms the method's row switches off weigh 0 (parallel LoRA, the no-buffer ablation)
        **method_registry.loss_weights(
            method, m, bool(buffer_tables(method, wildcards.step))
        ),
        "grad_log_every": m["grad_log_every"],
        "buffer_batch_size": m["buffer_batch_size"],
    }
    return settings(s)


def buffer_settings(strategy):
    m = config["medseqft"]
    return settings(
        {
            "strategy": strategy,
            "fraction": m["buffer_fraction"],
            "minimum": m["buffer_min"],
            "seed": config["seed"],
        }
    )


def get_buffer_settings(wildcards):
    return buffer_settings(wildcards.selection)


def evaluate_settings(seed=None):
    """Evaluation settings; ``seed`` is the training seed of the evaluated run (the metrics' seed column)."""
    return settings(
        {
            **config["inference"],
            **config["evaluate"],
            "patch_size": config["train"]["patch_size"],
            "seed": BASE_SEED if seed is None else int(seed),
            "device": config["device"],
        }
    )


def memory_mb(base):
    """A resources function: ``base`` MB on the first attempt, doubling on each retry (--retries)."""

    def get(wildcards, attempt):
        return base * 2 ** (attempt - 1)

    return get


def gpu_resource():
    return 1 if config["device"] == "cuda" else 0


# ---- targets -----------------------------------------------------------------------------------------
def evaluated_models():
    """Every (method, step) whose model is evaluated."""
    pairs = [(m, t) for m in SEQUENTIAL + PARALLEL for t in ORDER]
    pairs += [(m, "all") for m in MULTITASK]
    pairs += [(m, u) for m in TRANSFER for u in UNSEEN]
    return pairs


def get_metrics_tables(wildcards=None):
    tables = [
        f"{RESULTS}/eval/{run_name(m, seed)}/{s}/metrics.parquet"
        for m, s in evaluated_models()
        for seed in SEEDS
    ]
    return tables + active_eval_tables()


def get_final_outputs():
    outputs = [f"{RESULTS}/summary/metrics.parquet", f"{RESULTS}/summary/summary.md"]
    outputs += report_outputs()
    outputs += [f"{RESULTS}/scores/{t}/ssl.parquet" for t in TASKS]
    outputs += [f"{RESULTS}/scores/{t}/features.parquet" for t in TASKS]
    outputs += [
        f"{RESULTS}/buffers/{s}/{t}.parquet" for s in BUFFER_STRATEGIES for t in ORDER
    ]
    return outputs


# ---- summary and report (rules/report.smk) ------------------------------------------------------------
SUMMARY = f"{RESULTS}/summary"
PLOTS = f"{SUMMARY}/plots"


def training_steps():
    """Optimiser steps of the jobs that made each compared model from its start model, by method (and by
    ``assft_<strategy>@<step>`` for the active-learning models): the summary marks compute-matched pairs.
    """
    n = config["train"]["steps"]
    # K&G RFT: teacher + student
    steps = {m: METHOD[m].steps_per_task * n for m in ENABLED if m != "assft"}
    if ASSFT_ON:
        for q, _ in ACTIVE_RUNS:
            name = method_registry.active_method(q)
            steps[f"{name}@{method_registry.active_step(LAST_ROUND)}"] = n
            extra = SEMI + CONTROL if q == "dkd_asd" else []
            for k in extra:
                steps[f"{name}@{method_registry.active_step(LAST_ROUND, k)}"] = 2 * n
    return dict(sorted(steps.items()))


def summary_settings():
    s = config["summary"]
    return settings(
        {
            "reference": s["reference"],
            "n_boot": s["n_boot"],
            "ci": s["ci"],
            "case_resampling": s["case_resampling"],
            "seed": config["seed"],
            "order": ORDER,
            "labels_per_round": ASSFT["budget"] if ASSFT_ON else 0,
            "training_steps": training_steps(),
        }
    )


def plot_settings():
    s = config["summary"]
    return settings({"reference": s["reference"], "dpi": s["dpi"]})


def train_log_labels():
    """(method, step, stage, log file) of every training job: M0's pre-training (unless imported), then
    each evaluated model's jobs (stage `train`, or K&G RFT's `teacher` and `retention`).
    """
    logs = (
        []
        if config["foundation"]["checkpoint"]
        else [
            ("foundation", "pretrain", "pretrain", f"{FOUNDATION}/pretrain_log.parquet")
        ]
    )
    for method, step in evaluated_models():
        run = model_dir(method, step)
        if method in KGRFT and not reused_teacher(method, step):
            logs.append((method, step, "teacher", f"{run}/teacher/train_log.parquet"))
        if method in LORA:
            logs.append((method, step, "adapter", f"{run}/adapter/train_log.parquet"))
        else:
            logs.append((method, step, "train", f"{run}/train_log.parquet"))
    return logs


def get_train_logs():
    return [path for *_, path in train_log_labels()]


def train_log_args():
    """METHOD:STEP:STAGE:FILE per training log: stages.aggregate reads the labels, never the paths."""
    return shell_args(*(":".join(label) for label in train_log_labels()))


def overlay_models():
    """(task, step) of the reference method's own-step models: its best and worst test cases are drawn."""
    ref = config["summary"]["reference"]
    return [
        (t, s)
        for m, s in evaluated_models()
        if m == ref
        for t in eval_tasks(m, s)
        if s in (t, "all")
    ]


def overlay_predictions(step):
    return f"{RESULTS}/eval/{config['summary']['reference']}/{step}/predictions"


def get_overlay_predictions():
    return [overlay_predictions(s) for t, s in overlay_models()]


def get_overlay_manifests():
    return [f"{data_dir(t)}/manifest.parquet" for t, s in overlay_models()]


def overlay_args():
    """TASK:STEP:PREDICTIONS_DIR:DATA_DIR per overlay: the folders of the two input lists above."""
    return shell_args(
        *(
            f"{t}:{s}:{overlay_predictions(s)}:{data_dir(t)}"
            for t, s in overlay_models()
        )
    )


def forgetting_figure():
    """The R heat maps exist when a sequential method learned more than one task."""
    return [f"{PLOTS}/forgetting.png"] if SEQUENTIAL and len(ORDER) > 1 else []


def budget_figure():
    return [f"{PLOTS}/budget.png"] if ASSFT_ON else []


def overlay_figures():
    return [f"{PLOTS}/overlay_{t}.png" for t, s in overlay_models()]


def report_outputs():
    """The files the HTML report shows (rule all asks for them, so a plain run makes them)."""
    return [
        f"{SUMMARY}/summary.html",
        f"{PLOTS}/dice_boxplots.png",
        f"{PLOTS}/training_loss.png",
        *forgetting_figure(),
        *budget_figure(),
        *overlay_figures(),
    ]
