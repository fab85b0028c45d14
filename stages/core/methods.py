"""The method registry: one typed row per method, and the names that cross the workflow/stage boundary.

What a method *is* (which chain it belongs to, which training recipe each step runs, whether it has a
teacher, a buffer, LoRA, which loss terms are on, which model a step starts from) lives here as data.
``workflow/rules/common.smk`` derives every method list and every branch from it, and
``stages.aggregate`` reads the same run and step names back; both can be unit-tested without
Snakemake. Only the standard library is used, so the Snakefile imports it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ACTIVE_PREFIX",
    "MODEL_FILES",
    "CHAINS",
    "METHODS",
    "Method",
    "active_method",
    "active_step",
    "configurable",
    "enabled_methods",
    "eval_tasks",
    "loss_weights",
    "names",
    "run_name",
    "seed_folder",
    "split_active_step",
    "split_run",
    "start_kind",
]

Chain = Literal["sequential", "parallel", "multitask", "transfer", "active"]
CHAINS: tuple[Chain, ...] = ("sequential", "parallel", "multitask", "transfer", "active")
Start = Literal["previous", "foundation", "medseqft_last"]
Buffer = Literal["mds", "random"]


@dataclass(frozen=True)
class Method:
    """One method of the comparison (docs/methods.md §1-§2; docs/usage.md's method table is this registry).

    Attributes:
        name: the method's name in the config (``methods.<name>``), the run folders and the tables.
        chain: ``sequential`` (tasks in ``order``, each step from the previous model), ``parallel``
            (each task from M0), ``multitask`` (one job on every task), ``transfer`` (each unseen task
            from a finished model) or ``active`` (ASSFT's query rounds).
        recipe: the ``stages.train --recipe`` each step's model is trained with (K&G RFT methods:
            ``retention``, after a ``finetune`` teacher).
        teacher: a knowledge stage (a fully fine-tuned teacher T_t) precedes the retention stage.
        buffer: the buffer selection whose tables feed the retention terms, or None (no buffer).
        lora: the retention stage trains LoRA adapters (merged afterwards), not every weight.
        kd: the distillation term to the teacher is on.
        start: the model a step starts from: the chain's previous model (M0 before the first task),
            M0, or MedSeqFT's last model M_n.
        step_factor: training steps per step as a multiple of ``train.steps`` (compute-matched
            baselines).
        toggle: the config key that switches the method on (``methods.<name>.enabled``, or
            ``transfer.enabled`` for the transfer pair).
        default: whether the schema enables it by default.
        help: one line on what it is (the docs' method table).
    """

    name: str
    chain: Chain
    recipe: str
    help: str
    teacher: bool = False
    buffer: Buffer | None = None
    lora: bool = False
    kd: bool = False
    start: Start = "foundation"
    step_factor: int = 1
    toggle: str = "methods"
    default: bool = True

    @property
    def kgrft(self) -> bool:
        """A K&G RFT method (teacher, then a retention stage)."""
        return self.recipe == "retention" and self.teacher

    @property
    def merged(self) -> bool:
        """Each step ends with a LoRA adapter merged into its base (retention with LoRA)."""
        return self.recipe == "retention" and self.lora

    @property
    def retention(self) -> bool:
        """The buffer terms (feature retention and the buffer's own-head LwF) are on."""
        return self.buffer is not None

    @property
    def plain_first_step(self) -> bool:
        """Its first step is plain full FT of M0 on the first task (parallel FT's first step with the same
        ``step_factor``): sequential full FT, EWC (no Fisher yet) and LwF (no earlier head yet)."""
        return self.chain == "sequential" and self.recipe in ("finetune", "ewc", "lwf")

    @property
    def steps_per_task(self) -> int:
        """Optimiser steps per task, in units of ``train.steps`` (K&G RFT: teacher + student)."""
        return 2 if self.kgrft else self.step_factor


def _kgrft(name: str, help: str, buffer: Buffer | None = "mds", lora: bool = True) -> Method:
    return Method(
        name, "sequential", "retention", help, teacher=True, buffer=buffer, lora=lora, kd=True, start="previous"
    )


#: The files of a trained model folder that a reused step copies (``stages.reuse``, rule ``reuse_first_step``),
#: in the order they are written (the weights last, so a model.safetensors never stands without its description).
MODEL_FILES = ("train_log.parquet", "model.json", "model.safetensors")


#: Every method, in the order the workflow lists (and evaluates) them.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sequential_ft",
            "sequential",
            "finetune",
            "naive sequential full fine-tuning, no retention",
            start="previous",
        ),
        Method(
            "sequential_ft_2x",
            "sequential",
            "finetune",
            "naive sequential full FT for 2 x `train.steps`: compute-matched to K&G RFT",
            start="previous",
            step_factor=2,
            default=False,
        ),
        _kgrft("medseqft", "MDS buffers + K&G RFT: teacher, LoRA retention with KD, merge (docs/methods.md §1)"),
        _kgrft("ablation_random_buffer", "MedSeqFT with a random buffer instead of MDS", buffer="random"),
        _kgrft("ablation_no_buffer", "MedSeqFT without buffer retention (lambda_g = 0)", buffer=None),
        _kgrft("ablation_no_lora", "MedSeqFT whose retention stage trains every weight (no LoRA)", lora=False),
        Method(
            "ewc",
            "sequential",
            "ewc",
            "sequential full FT + online EWC: a Fisher-weighted pull to the previous model (Schwarz et al. 2018)",
            start="previous",
            default=False,
        ),
        Method(
            "lwf",
            "sequential",
            "lwf",
            "sequential full FT + LwF: KL to the previous model's earlier-task heads on the new task's data "
            "(Li & Hoiem 2016)",
            start="previous",
            default=False,
        ),
        Method("parallel_ft", "parallel", "finetune", "full fine-tuning of each task from M0"),
        Method(
            "parallel_ft_2x",
            "parallel",
            "finetune",
            "parallel full FT for 2 x `train.steps`: compute-matched to K&G RFT",
            step_factor=2,
            default=False,
        ),
        Method(
            "parallel_lora", "parallel", "retention", "LoRA (plus the head) on each task from M0, merged", lora=True
        ),
        Method("multitask_ft", "multitask", "multitask", "full fine-tuning on all tasks at once, one head each"),
        Method("transfer_from_m0", "transfer", "finetune", "full FT of M0 on each unseen task", toggle="transfer"),
        Method(
            "transfer_from_medseqft",
            "transfer",
            "finetune",
            "full FT of MedSeqFT's M_n on each unseen task",
            start="medseqft_last",
            toggle="transfer",
        ),
        Method(
            "assft",
            "active",
            "semisupervised",
            "active query rounds on the target task, then selective semi-supervised FT (docs/methods.md §2)",
        ),
    )
}


def names(chain: Chain | None = None, methods: Sequence[str] | None = None) -> list[str]:
    """Method names in registry order: of one chain and/or among ``methods`` (None: every one)."""
    return [
        m for m, row in METHODS.items() if (chain is None or row.chain == chain) and (methods is None or m in methods)
    ]


def configurable() -> list[str]:
    """The methods switched by ``methods.<name>.enabled`` (the schema's ``methods`` keys)."""
    return [m for m, row in METHODS.items() if row.toggle == "methods"]


def enabled_methods(config: Mapping[str, Any]) -> list[str]:
    """The methods a (validated) config runs, in registry order.

    ``methods.<name>.enabled`` switches the configurable ones; the transfer pair runs with
    ``transfer.enabled`` and unseen tasks, ``transfer_from_medseqft`` only when MedSeqFT runs.
    """
    switched = {m for m, s in config["methods"].items() if s["enabled"]}
    out = [m for m in configurable() if m in switched]
    if config["transfer"]["enabled"] and config["unseen"]:
        out += [m for m in names("transfer") if METHODS[m].start != "medseqft_last" or "medseqft" in switched]
    return [m for m in METHODS if m in out]


def start_kind(method: str) -> Start:
    """Where a step of ``method`` starts (see :class:`Method`)."""
    return METHODS[method].start


def eval_tasks(method: str, step: str, order: Sequence[str]) -> list[str]:
    """The tasks the model of ``(method, step)`` is evaluated on: a sequential model on every task so far."""
    chain = METHODS[method].chain
    if chain == "sequential":
        return list(order[: list(order).index(step) + 1])
    if chain == "multitask":
        return list(order)
    return [step]


def loss_weights(method: str, medseqft: Mapping[str, Any], has_buffer: bool) -> dict[str, float]:
    """The retention recipe's loss-term weights for ``method``: a term its row switches off weighs 0.

    Parallel LoRA has no teacher and no buffer (KD, retention and buffer LwF off); the no-buffer
    ablation keeps KD and drops the buffer terms.

    Args:
        method: a method whose recipe is ``retention``.
        medseqft: the config's ``medseqft`` section (the weights when on).
        has_buffer: the step has buffer tables (B_1..B_t).
    """
    row = METHODS[method]
    buffered = row.retention and has_buffer
    return {
        "kd_weight": medseqft["kd_weight"] if row.kgrft else 0.0,
        "retention_weight": medseqft["retention_weight"] if buffered else 0.0,
        "lwf_weight": medseqft["lwf_weight"] if buffered else 0.0,
    }


# ---- names that cross the workflow/stage boundary --------------------------------------------------
ACTIVE_PREFIX = "assft_"


def seed_folder(seed: int) -> str:
    """The folder level of a training seed other than the base seed (``seed{s}``)."""
    return f"seed{int(seed)}"


def run_name(method: str, seed: int | None, base_seed: int) -> str:
    """The run of ``method`` under training seed ``seed`` (None = the base seed): its path level(s).

    The base seed keeps the one-seed layout ``{method}``; another seed s is ``{method}/seed{s}``.
    """
    seed = base_seed if seed is None else int(seed)
    return method if seed == base_seed else f"{method}/{seed_folder(seed)}"


def split_run(run: str, base_seed: int) -> tuple[str, int]:
    """(method, training seed) of a run name (see :func:`run_name`)."""
    method, sep, level = run.partition("/")
    if not sep:
        return method, base_seed
    if not level.startswith("seed") or not level[len("seed") :].isdigit():
        raise ValueError(f"not a run name: {run!r} (expected METHOD or METHOD/seed<N>)")
    return method, int(level[len("seed") :])


def active_method(strategy: str) -> str:
    """The method name an ASSFT chain's models are recorded under (``assft_<strategy>``)."""
    return f"{ACTIVE_PREFIX}{strategy}"


def active_step(round_: int, kind: str = "l") -> str:
    """The step name of an ASSFT model: ``round{r}`` for the round model, ``round{r}+{kind}`` otherwise.

    Args:
        round_: the query round.
        kind: ``l`` (the round model) or the continuation (``selective``, ``all``, ``continue``); a
            ``model_`` prefix (the folder name) is dropped.
    """
    kind = kind.removeprefix("model_")
    return f"round{int(round_)}" + ("" if kind == "l" else f"+{kind}")


def split_active_step(step: str) -> tuple[int, str] | None:
    """(round, kind) of an ASSFT step name (kind ``l`` for the round model); None if it is not one."""
    head, _, kind = step.partition("+")
    if not head.startswith("round") or not head[len("round") :].isdigit():
        return None
    return int(head[len("round") :]), kind or "l"
