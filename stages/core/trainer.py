"""The one resumable trainer behind every training job: optimiser, schedule, AMP, checkpoints, signals.

It knows no recipe. A recipe hands it a *step function* that draws its own batch (from the generator
the trainer passes) and returns its loss terms; the trainer does the rest: AdamW, a cosine schedule
with optional linear warm-up, autocast and gradient scaling on CUDA, gradient clipping, periodic
validation with best-state tracking, atomic checkpoints, and automatic resumption. On CPU a run that is
interrupted at any step and resumed ends bit-identical to an uninterrupted one, because the checkpoint
holds every piece of state the next step reads: weights, optimiser, scheduler, scaler, the sampling
generator and torch's global RNG (dropout).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages.core.errors import InputError
from stages.core.io import atomic_path
from stages.core.settings import from_mapping, setting
from stages.core.signals import StopSignal

__all__ = ["CHECKPOINT_NAME", "StepFn", "TrainResult", "TrainSettings", "Trainer", "ValidateFn", "lr_factor"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_latest.pt"

StepFn = Callable[[nn.Module, int, torch.Generator], Mapping[str, torch.Tensor]]
"""``step_fn(model, step, generator) -> {"loss": tensor, ...}``; ``step`` is the 0-based index of the update."""

ValidateFn = Callable[[nn.Module], float]
"""``validate_fn(model) -> score``; higher is better."""

_RESERVED_COLUMNS = frozenset({"step", "lr", "seconds", "val_score"})


@dataclass
class TrainSettings:
    """How to optimise; the recipe decides what. The defaults are the schema's (``train`` section).

    Args:
        steps: number of optimiser updates.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW's decoupled weight decay (Loshchilov & Hutter, ICLR 2019).
        warmup_steps: linear warm-up steps before the cosine decay (0 = none).
        grad_clip: maximum global gradient norm (None = no clipping; nnU-Net uses 12).
        checkpoint_every: save the resumable checkpoint every this many updates (and at the end).
        val_every: run the validation every this many updates and at the end (0 = never).
        amp: mixed precision on CUDA (bfloat16 where supported, else float16 with a gradient scaler);
            ignored on CPU.
        device: torch device string ("cpu", "cuda", "cuda:1").
        seed: seeds the sampling generator and torch's global RNG at the start of a fresh run.
    """

    steps: int = setting(help="number of optimiser updates", schema="train.steps")
    lr: float = setting(3e-4, help="peak learning rate (AdamW)", schema="train.lr")
    weight_decay: float = setting(1e-5, help="AdamW's decoupled weight decay", schema="train.weight_decay")
    warmup_steps: int = setting(0, help="linear warm-up updates before the cosine decay", schema="train.warmup_steps")
    grad_clip: float | None = setting(12.0, help="maximum global gradient norm (None = no clipping)")
    checkpoint_every: int = setting(100, help="updates between resumable checkpoints", schema="train.checkpoint_every")
    val_every: int = setting(0, help="updates between validations (0 = never)", schema="train.val_every")
    amp: bool = setting(True, help="mixed precision on CUDA; ignored on CPU", schema="train.amp")
    device: str = setting("cpu", help="torch device string", schema="device")
    seed: int = setting(0, help="seeds the sampling generator and torch's global RNG", schema="seed")

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", 0 <= self.warmup_steps < self.steps, "must be in [0, steps)"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be > 0 or null"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("val_every", self.val_every >= 0, "must be >= 0"),
        ]
        for key, ok, problem in checks:
            if not ok:
                raise InputError(f"settings.{key}", f"{problem}, got {getattr(self, key)!r}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], where: str = "settings") -> TrainSettings:
        """Build from a config mapping, refusing unknown and missing keys (:func:`stages.core.settings.from_mapping`).

        Args:
            settings: keys are this dataclass's field names.
            where: the config location, for the error message.
        """
        return from_mapping(cls, settings, "trainer", where)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Args:
        final_state: the model's state dict after the last update (CPU tensors).
        best_state: the state with the best validation score, or ``final_state`` without validation.
        best_score: that score (None without validation, or when no score was finite).
        best_step: updates done when the best state was taken (``steps`` without validation).
        log: one row per update: ``step`` (1-based count of updates done), each loss term, ``lr`` (the
            rate that update used; the first group's with parameter groups, the others' as ``lr_<name>``),
            ``seconds`` (its wall time) and ``val_score`` (NaN where not computed).
        resumed_from: updates done in the checkpoint this run resumed from, or None for a fresh run.
    """

    final_state: dict[str, torch.Tensor]
    best_state: dict[str, torch.Tensor]
    best_score: float | None
    best_step: int
    log: pd.DataFrame
    resumed_from: int | None = None


@dataclass
class _WarmupCosine:
    """Multiplier of the peak learning rate at 0-based update ``step``.

    Linear warm-up ``(step + 1) / warmup`` for ``step < warmup``, then the cosine decay of SGDR
    (Loshchilov & Hutter, ICLR 2017) without restarts, ``0.5 (1 + cos(pi t))`` with
    ``t = (step - warmup) / (steps - warmup)``, reaching 0 after the last update. A plain dataclass so
    ``LambdaLR.state_dict`` can save it.
    """

    steps: int
    warmup: int

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.steps, self.warmup)


def lr_factor(step: int, steps: int, warmup: int = 0) -> float:
    """Learning-rate multiplier for 0-based update ``step`` of ``steps`` (see :class:`_WarmupCosine`).

    Args:
        step: 0-based update index.
        steps: total updates.
        warmup: linear warm-up updates.
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the model's state dict on the CPU (later updates cannot change it)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Trainer:
    """Runs ``step_fn`` for ``settings.steps`` updates, resumably.

    Args:
        model: the network; moved to ``settings.device``. Its ``state_dict`` is what is checkpointed,
            so every trained parameter must belong to it.
        parameters: the parameters to optimise (e.g. only LoRA and head parameters); each must be one of
            ``model``'s. Or AdamW parameter groups: dicts with ``params`` and optionally ``lr`` (the
            group's peak rate; the schedule scales every group alike) and ``name`` (the log then has a
            column ``lr_<name>`` per group after the first).
        step_fn: ``step_fn(model, step, generator) -> {"loss": tensor, ...}``: draws its batch using only
            ``generator`` for randomness, runs the forward pass and returns the loss terms; ``"loss"`` is
            backpropagated, every term is logged. ``step`` is the 0-based index of the update.
        settings: optimisation settings.
        work_dir: folder for ``checkpoint_latest.pt``; not a declared output, so Snakemake keeps it.
        config_hash: hash of everything that defines the job; a checkpoint written for another hash is
            refused rather than silently continued.
        validate_fn: ``validate_fn(model) -> score`` (higher is better), run under ``torch.no_grad``
            with the RNG state forked, so it changes nothing the training reads.
        name: label for the log and progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        step_fn: StepFn,
        settings: TrainSettings,
        work_dir: Path,
        config_hash: str,
        validate_fn: ValidateFn | None = None,
        name: str = "train",
    ) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.model = model.to(self.device)
        given = list(parameters)
        if given and all(isinstance(g, dict) for g in given):
            groups = [{**g, "params": list(g["params"])} for g in given]
        else:
            groups = [{"params": given}]
        self.parameters = [p for g in groups for p in g["params"]]
        if not self.parameters:
            raise ValueError(f"{name}: no parameters to optimise")
        owned = {id(p) for p in self.model.parameters()}
        if any(id(p) not in owned for p in self.parameters):
            raise ValueError(f"{name}: every optimised parameter must belong to the model (it is what is saved)")
        self.step_fn = step_fn
        self.validate_fn = validate_fn
        self.work_dir = Path(work_dir)
        self.checkpoint_path = self.work_dir / CHECKPOINT_NAME
        self.config_hash = config_hash
        self.name = name

        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _WarmupCosine(settings.steps, settings.warmup_steps)
        )
        self.amp_dtype: torch.dtype | None = None
        if settings.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # bfloat16 has float32's exponent range, so only float16 needs loss scaling.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(settings.seed)

        self.step = 0
        self.rows: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------- checkpoint
    def _save_checkpoint(self) -> None:
        state = {
            "config_hash": self.config_hash,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_state": self.best_state,
            "log": self.rows,
        }
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self) -> int | None:
        """Restore from the checkpoint if there is one; return its step, or None for a fresh start."""
        path = self.checkpoint_path
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(path, f"unreadable checkpoint ({err}); delete {self.work_dir} to start over") from err
        if state.get("config_hash") != self.config_hash:
            raise InputError(
                path,
                f"was written for config hash {state.get('config_hash')}, this job has {self.config_hash}: "
                f"refusing to resume; delete {self.work_dir} to start over",
            )
        if state["step"] > self.settings.steps:
            raise InputError(
                path,
                f"is at step {state['step']}, beyond this job's {self.settings.steps} steps; "
                f"delete {self.work_dir} to start over",
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state["cuda_rng"]
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        self.step = int(state["step"])
        self.rows = list(state["log"])
        self.best_score = state["best_score"]
        self.best_step = state["best_step"]
        self.best_state = state["best_state"]
        return self.step

    # ------------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _update(self, index: int) -> dict[str, float]:
        """One optimiser update at 0-based ``index``; returns the loss terms as floats."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.step_fn(self.model, index, self.generator)
        if "loss" not in terms:
            raise KeyError(f"{self.name}: step_fn must return a 'loss' term, got {sorted(terms)}")
        clash = _RESERVED_COLUMNS.intersection(terms)
        if clash:
            raise KeyError(f"{self.name}: step_fn returned reserved log names {sorted(clash)}")
        loss = terms["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"{self.name}: loss is {loss.item()} at step {index + 1}")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return {k: float(v.detach().float()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}

    def _validate(self) -> float:
        assert self.validate_fn is not None
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # Forked RNG: validation (e.g. MC dropout) must not shift the training's random stream.
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
            score = float(self.validate_fn(self.model))
        self.model.train()
        if math.isfinite(score) and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_step, self.best_state = score, self.step, _cpu_state(self.model)
        return score

    def _train_loop(self) -> None:
        s = self.settings
        validating = self.validate_fn is not None and s.val_every > 0
        stop = StopSignal(self.name, "step", log)
        bar = tqdm(
            total=s.steps, initial=self.step, desc=self.name, file=sys.stderr, mininterval=1.5, dynamic_ncols=True
        )
        try:
            with stop.installed():
                while self.step < s.steps:
                    started = time.perf_counter()
                    groups = self.optimizer.param_groups
                    rates = {"lr": groups[0]["lr"]}
                    rates.update({f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(groups) if i > 0})
                    terms = self._update(self.step)
                    self.step += 1
                    row: dict[str, Any] = {"step": self.step, **terms, **rates}
                    row["seconds"] = time.perf_counter() - started
                    row["val_score"] = math.nan
                    if validating and (self.step % s.val_every == 0 or self.step == s.steps):
                        row["val_score"] = self._validate()
                    self.rows.append(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
                    # read the flag once: a signal landing between save and exit is handled next step
                    stopping = stop.signum
                    if self.step % s.checkpoint_every == 0 or self.step == s.steps or stopping is not None:
                        self._save_checkpoint()
                    if stopping is not None and self.step < s.steps:
                        log.warning("%s: checkpoint saved at step %d; exiting", self.name, self.step)
                        raise SystemExit(128 + stopping)
        finally:
            bar.close()

    def fit(self) -> TrainResult:
        """Train to ``settings.steps`` updates, resuming from ``work_dir`` when a checkpoint is there.

        Raises:
            InputError: the checkpoint belongs to another configuration.
            SystemExit: 143 after SIGTERM, 130 after SIGINT, once the checkpoint is saved.
        """
        s = self.settings
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        # The global RNG (dropout) is seeded and checkpointed for the run, then handed back as it was.
        with torch.random.fork_rng(devices=cuda_devices):
            resumed_from = self._load_checkpoint()
            if resumed_from is None:
                torch.manual_seed(s.seed)
                self.generator.manual_seed(s.seed)
            else:
                log.info("%s: resuming from step %d (%s)", self.name, resumed_from, self.checkpoint_path)
            self._train_loop()
        if resumed_from == s.steps:
            log.info("%s: the checkpoint is already complete (%d steps)", self.name, s.steps)
        final_state = _cpu_state(self.model)
        if self.best_state is None:
            best_state, best_step = final_state, s.steps
        else:
            best_state, best_step = self.best_state, int(self.best_step or 0)
        return TrainResult(
            final_state=final_state,
            best_state=best_state,
            best_score=self.best_score,
            best_step=best_step,
            log=pd.DataFrame(self.rows),
            resumed_from=resumed_from,
        )
