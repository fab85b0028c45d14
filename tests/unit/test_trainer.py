"""Tests for stages.core.trainer: bit-identical resume, signals, config-hash refusal, best state, schedule."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.core.errors import InputError
from stages.core.sampling import CaseStore, PatchSampler
from stages.core.trainer import CHECKPOINT_NAME, Trainer, TrainResult, TrainSettings

STEPS = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cases = []
    for i, shape in enumerate([(19, 21, 17), (24, 18, 20), (15, 23, 22)]):
        seg = np.zeros(shape, np.uint8)
        seg[4:10, 5:11, 3:9] = 1
        image = rng.normal(size=(1, *shape)).astype(np.float32) + seg
        np.save(root / f"case{i}.npy", image)
        np.save(root / f"case{i}_seg.npy", seg)
        cases.append(f"case{i}")
    return CaseStore(root, cases)


def _net() -> nn.Module:
    """Two Conv3d layers with dropout in between, so the global RNG matters too."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout3d(0.3), nn.Conv3d(4, 2, 1))


def _step_fn(store: CaseStore) -> Callable[[nn.Module, int, torch.Generator], dict[str, torch.Tensor]]:
    sampler = PatchSampler(store, (16, 16, 16), batch_size=2, fg_ratio=0.5, flips=True)

    def step(model: nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = sampler.sample(generator)
        logits = model(batch["image"])
        ce = nn.functional.cross_entropy(logits, batch["label"][:, 0])
        reg = 1e-3 * sum(p.square().sum() for p in model.parameters())
        return {"loss": ce + reg, "ce": ce, "reg": reg}

    return step


def _trainer(store: CaseStore, work_dir: Path, step_fn=None, config_hash: str = "abc", **overrides) -> Trainer:
    model = _net()
    settings = TrainSettings(**{"steps": STEPS, "lr": 1e-2, "warmup_steps": 2, "checkpoint_every": 25, **overrides})
    return Trainer(model, model.parameters(), step_fn or _step_fn(store), settings, work_dir, config_hash)


@pytest.fixture(scope="module")
def reference(store: CaseStore, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The uninterrupted run."""
    return _trainer(store, tmp_path_factory.mktemp("ref")).fit()


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_uninterrupted_run(reference: TrainResult, store: CaseStore, tmp_path: Path) -> None:
    log = reference.log
    assert list(log["step"]) == list(range(1, STEPS + 1))
    assert {"loss", "ce", "reg", "lr", "seconds", "val_score"} <= set(log.columns)
    assert reference.resumed_from is None and reference.best_step == STEPS and reference.best_score is None
    _assert_same_state(reference.best_state, reference.final_state)
    assert log["loss"].iloc[-3:].mean() < log["loss"].iloc[:3].mean()  # it learns
    # the same settings from scratch give the same weights (CPU reproducibility)
    _assert_same_state(_trainer(store, tmp_path).fit().final_state, reference.final_state)


def _interrupting(store: CaseStore, at: int, how: str) -> Callable:
    inner = _step_fn(store)

    def step(model: nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = inner(model, step, generator)
        if step == at:
            if how == "crash":
                raise RuntimeError("node died")
            os.kill(os.getpid(), signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        return out

    return step


@pytest.mark.parametrize(
    ("how", "at", "every", "code", "resume_step"),
    [
        ("sigterm", 4, 25, 143, 5),  # signal during update 5: finish it, checkpoint, exit 143
        ("sigint", 8, 3, 130, 9),
        ("crash", 6, 4, None, 4),  # a crash loses the unsaved steps: resume from the last checkpoint
    ],
)
def test_interrupt_and_resume_is_bit_identical(
    reference: TrainResult, store: CaseStore, tmp_path: Path, how: str, at: int, every: int, code, resume_step: int
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupted = _trainer(store, tmp_path, _interrupting(store, at, how), checkpoint_every=every)
    if code is None:
        with pytest.raises(RuntimeError, match="node died"):
            interrupted.fit()
    else:
        with pytest.raises(SystemExit) as exit_info:
            interrupted.fit()
        assert exit_info.value.code == code
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == resume_step and saved["config_hash"] == "abc"

    # someone else using the global RNG in between must not matter
    torch.rand(100)
    resumed = _trainer(store, tmp_path, checkpoint_every=every).fit()
    assert resumed.resumed_from == resume_step
    _assert_same_state(resumed.final_state, reference.final_state)
    cols = ["step", "loss", "ce", "reg", "lr"]
    assert resumed.log[cols].equals(reference.log[cols])
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == STEPS

    # a finished checkpoint is returned as is, without another step
    def never(*_: object) -> dict[str, torch.Tensor]:
        raise AssertionError("no step should run")

    again = _trainer(store, tmp_path, never).fit()
    assert again.resumed_from == STEPS
    _assert_same_state(again.final_state, reference.final_state)


def test_config_hash_mismatch_refuses(reference: TrainResult, store: CaseStore, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _trainer(store, tmp_path, _interrupting(store, 2, "sigterm")).fit()
    with pytest.raises(InputError, match=r"checkpoint_latest\.pt.*config hash abc, this job has xyz.*delete"):
        _trainer(store, tmp_path, config_hash="xyz").fit()
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        _trainer(store, tmp_path).fit()


def test_best_state_selection_and_validation_isolation(
    reference: TrainResult, store: CaseStore, tmp_path: Path
) -> None:
    scores = iter([0.1, 0.7, 0.3, 0.5])  # validations after steps 3, 6, 9, 12
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate(model: nn.Module) -> float:
        assert not torch.is_grad_enabled()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        model.train()
        model(torch.rand(1, 1, 8, 8, 8))  # draws from the global RNG (dropout, torch.rand)
        return next(scores)

    model = _net()
    settings = TrainSettings(steps=STEPS, lr=1e-2, warmup_steps=2, val_every=3)
    result = Trainer(model, model.parameters(), _step_fn(store), settings, tmp_path, "abc", validate).fit()
    assert result.best_step == 6 and result.best_score == pytest.approx(0.7)
    _assert_same_state(result.best_state, snapshots[1])
    assert not all(torch.equal(result.best_state[k], result.final_state[k]) for k in result.final_state)
    assert list(result.log["val_score"].dropna()) == pytest.approx([0.1, 0.7, 0.3, 0.5])
    assert list(result.log.dropna(subset=["val_score"])["step"]) == [3, 6, 9, 12]
    # validation touched neither the sampling generator nor the training's global RNG stream
    _assert_same_state(result.final_state, reference.final_state)


def test_lr_follows_warmup_cosine(reference: TrainResult, store: CaseStore, tmp_path: Path) -> None:
    base, warmup = 1e-2, 2
    expected = [base * (k + 1) / warmup for k in range(warmup)]
    expected += [base * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (STEPS - warmup))) for k in range(warmup, STEPS)]
    assert list(reference.log["lr"]) == pytest.approx(expected, rel=1e-12)
    no_warmup = _trainer(store, tmp_path, warmup_steps=0, steps=4).fit()
    assert list(no_warmup.log["lr"]) == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_only_given_parameters_train(store: CaseStore, tmp_path: Path) -> None:
    model = _net()
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    settings = TrainSettings(steps=3)
    result = Trainer(model, model[3].parameters(), _step_fn(store), settings, tmp_path, "h").fit()
    _assert_same_state({k: result.final_state[f"0.{k}"] for k in frozen}, frozen)
    with pytest.raises(ValueError, match="belong to the model"):
        Trainer(model, nn.Linear(2, 2).parameters(), _step_fn(store), settings, tmp_path, "h")


def test_parameter_groups_have_their_own_rates_and_resume(store: CaseStore, tmp_path: Path) -> None:
    """AdamW groups (e.g. LoRA at 10x the head's rate): each keeps its peak rate under the one schedule,
    the log has ``lr`` (first group) and ``lr_<name>``, and a crashed run resumes bit-identical."""

    def trainer(work: Path, step_fn=None) -> Trainer:
        model = _net()
        groups = [
            {"params": list(model[0].parameters()), "lr": 1e-1, "name": "fast"},
            {"params": list(model[3].parameters()), "name": "slow"},
        ]
        settings = TrainSettings(steps=8, lr=1e-2, warmup_steps=1, checkpoint_every=3)
        return Trainer(model, groups, step_fn or _step_fn(store), settings, work, "g")

    ref = trainer(tmp_path / "ref").fit()
    np.testing.assert_allclose(ref.log["lr"], 10 * ref.log["lr_slow"], rtol=1e-12)
    assert ref.log["lr"].iloc[0] == pytest.approx(1e-1)
    with pytest.raises(RuntimeError, match="node died"):
        trainer(tmp_path / "cut", _interrupting(store, 4, "crash")).fit()
    resumed = trainer(tmp_path / "cut").fit()
    assert resumed.resumed_from == 3
    _assert_same_state(resumed.final_state, ref.final_state)


def test_step_fn_contract(store: CaseStore, tmp_path: Path) -> None:
    def no_loss(model: nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"ce": model(torch.zeros(1, 1, 4, 4, 4)).mean()}

    with pytest.raises(KeyError, match="'loss'"):
        _trainer(store, tmp_path / "a", no_loss).fit()

    def nan_loss(model: nn.Module, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"loss": model(torch.zeros(1, 1, 4, 4, 4)).mean() * math.nan}

    with pytest.raises(FloatingPointError, match="step 1"):
        _trainer(store, tmp_path / "b", nan_loss).fit()


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"steps": 0}, "settings.steps"),
        ({"steps": 5, "warmup_steps": 5}, "settings.warmup_steps"),
        ({"steps": 5, "grad_clip": 0}, "settings.grad_clip"),
        ({"steps": 5, "checkpoint_every": 0}, "settings.checkpoint_every"),
        ({"steps": 5, "learning_rate": 0.1}, "unknown"),
        ({"lr": 0.1}, "steps"),
    ],
)
def test_bad_settings(settings: dict, key: str) -> None:
    with pytest.raises(InputError, match=key):
        TrainSettings.from_mapping(settings)
    assert TrainSettings.from_mapping({"steps": 5, "lr": 0.1}).lr == 0.1
