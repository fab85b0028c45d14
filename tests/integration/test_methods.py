"""The method registry decides every method's chain, start model, evaluated tasks and loss terms; the
schema, the Snakefile's method wildcard and the docs' method table list exactly its methods."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, make_workdir, snakemake

from stages.core import methods
from stages.core.config import SCHEMA_PATH, validate_config

ORDER = ["a", "b", "c"]
MEDSEQFT = {"kd_weight": 1.0, "retention_weight": 0.5, "lwf_weight": 0.5}


def test_every_row_is_consistent() -> None:
    for name, row in methods.METHODS.items():
        assert row.name == name and row.chain in methods.CHAINS and row.help
        if row.buffer is not None or row.kd:
            assert row.kgrft, name  # only K&G RFT has a buffer or a teacher to distil from
        if row.chain == "sequential":
            assert row.start == "previous", name
        assert row.steps_per_task == (2 if row.kgrft else row.step_factor)


@pytest.mark.parametrize(
    ("method", "start", "tasks_at_b"),
    [
        ("sequential_ft", "previous", ["a", "b"]),
        ("medseqft", "previous", ["a", "b"]),
        ("ewc", "previous", ["a", "b"]),
        ("lwf", "previous", ["a", "b"]),
        ("parallel_ft", "foundation", ["b"]),
        ("parallel_lora", "foundation", ["b"]),
        ("transfer_from_m0", "foundation", ["b"]),
        ("transfer_from_medseqft", "medseqft_last", ["b"]),
    ],
)
def test_start_model_and_evaluated_tasks(method: str, start: str, tasks_at_b: list[str]) -> None:
    assert methods.start_kind(method) == start
    assert methods.eval_tasks(method, "b", ORDER) == tasks_at_b
    assert methods.eval_tasks("multitask_ft", "all", ORDER) == ORDER


def test_loss_terms_each_method_switches_off() -> None:
    assert methods.loss_weights("medseqft", MEDSEQFT, True) == MEDSEQFT
    assert methods.loss_weights("ablation_no_lora", MEDSEQFT, True) == MEDSEQFT
    # parallel LoRA: no teacher, no buffer; the no-buffer ablation: KD only
    assert methods.loss_weights("parallel_lora", MEDSEQFT, True) == dict.fromkeys(MEDSEQFT, 0.0)
    assert methods.loss_weights("ablation_no_buffer", MEDSEQFT, False) == {
        "kd_weight": 1.0,
        "retention_weight": 0.0,
        "lwf_weight": 0.0,
    }
    assert methods.METHODS["ablation_random_buffer"].buffer == "random"
    assert [m for m, r in methods.METHODS.items() if r.merged] == [
        "medseqft",
        "ablation_random_buffer",
        "ablation_no_buffer",
        "parallel_lora",
    ]


def test_enabled_methods_follow_the_config() -> None:
    config = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    enabled = methods.enabled_methods(config)
    assert {"ewc", "lwf", "medseqft", "transfer_from_m0", "transfer_from_medseqft", "assft"} <= set(enabled)
    assert "sequential_ft_2x" not in enabled
    config["methods"]["medseqft"]["enabled"] = False
    assert "transfer_from_medseqft" not in methods.enabled_methods(config)
    assert "transfer_from_m0" in methods.enabled_methods(config)
    config["unseen"] = []
    assert not set(methods.names("transfer")) & set(methods.enabled_methods(config))


def test_names_that_cross_the_boundary_round_trip() -> None:
    assert methods.run_name("ewc", None, 0) == "ewc" and methods.run_name("ewc", 3, 0) == "ewc/seed3"
    assert methods.split_run("ewc/seed3", 0) == ("ewc", 3) and methods.split_run("ewc", 7) == ("ewc", 7)
    with pytest.raises(ValueError, match="not a run name"):
        methods.split_run("ewc/three", 0)
    assert methods.active_method("dkd_asd") == "assft_dkd_asd"
    assert methods.active_step(1) == "round1" and methods.active_step(1, "model_l") == "round1"
    assert methods.active_step(2, "model_selective") == "round2+selective"
    assert methods.split_active_step("round2+continue") == (2, "continue")
    assert methods.split_active_step("round0") == (0, "l") and methods.split_active_step("liver") is None


# ---- the registry test: schema, Snakefile and docs list exactly the registry's methods ------------------
def test_schema_method_keys_are_the_registry() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]
    toggles = schema["methods"]["properties"]
    assert set(toggles) == set(methods.configurable())
    for name, sub in toggles.items():
        assert sub["properties"]["enabled"]["default"] is methods.METHODS[name].default, name
    landscape = schema["analysis"]["properties"]["landscape"]["properties"]["methods"]["items"]["enum"]
    assert landscape == [m for m, r in methods.METHODS.items() if r.chain in ("sequential", "parallel", "multitask")]


def test_docs_method_table_is_the_registry() -> None:
    text = (REPO / "docs" / "usage.md").read_text()
    section = text.split("## Methods\n", 1)[1]
    table = section[section.index("| method | steps | what it is |") :].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    documented = [name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert documented == list(methods.METHODS)


def test_snakefile_method_wildcard_admits_every_registry_method(tmp_path: Path) -> None:
    """A dry run with every method on plans a model of each non-active method (the wildcard admits it)."""
    config = yaml.safe_load(TINY.read_text())
    config["methods"] = {m: {"enabled": True} for m in methods.configurable()}
    config["analysis"] = {"drift": {"enabled": False}, "landscape": {"enabled": False}}
    work = make_workdir(tmp_path / "w", config)
    proc = snakemake(work, "-n")
    planned = set(re.findall(r"results/eval/([a-z0-9_]+)/[a-z_]+/metrics\.parquet", proc.stdout))
    assert planned == {m for m, r in methods.METHODS.items() if r.chain != "active"}
    assert "estimate_fisher" in proc.stdout
