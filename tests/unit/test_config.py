"""A wrong configuration stops before any job, naming the key; every schema key documents itself."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.core.config import SCHEMA_PATH, load_config, validate_config
from stages.core.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def demo_config() -> dict[str, Any]:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_demo_config_is_valid_and_defaults_are_filled() -> None:
    config = validate_config(demo_config())
    assert config["foundation"]["ssl"]["inpaint_weight"] == 1.0  # default from the schema
    assert config["tasks"][0]["labels"] is None
    assert config["order"] == ["organ_lesion", "paired_organs", "tubular"]


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, sub in schema.get("properties", {}).items():
        out.append((f"{path}.{name}".lstrip("."), sub))
        out += _walk(sub, f"{path}.{name}")
    if "items" in schema and isinstance(schema["items"], dict):
        out += _walk(schema["items"], f"{path}[]")
    return out


def test_every_schema_key_has_type_description_default() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    for key, sub in _walk(schema):
        for field in ("type", "description", "default"):
            assert field in sub, f"schema key {key} lacks {field}"


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (lambda c: c["train"].update(steps="many"), "config: train.steps", "is not of type 'integer'"),
        (lambda c: c["train"].update(stepz=5), "config: train", "unknown key"),
        (lambda c: c.update(extra=1), "config: (top level)", "unknown key"),
        (lambda c: c["train"].update(lr=-1.0), "config: train.lr", "less than or equal to the minimum"),
        (lambda c: c["tasks"][0].update(name="bad name"), "config: tasks[0].name", "does not match"),
        (lambda c: c["tasks"].append(dict(c["tasks"][0])), "config: tasks", "duplicate task names"),
        (lambda c: c.update(order=["nope"]), "config: order", "names no task"),
        (lambda c: c.update(unseen=["organ_lesion"]), "config: unseen", "also in `order`"),
        (lambda c: c["preprocess"]["split"].update(val=0.5, test=0.5), "config: preprocess.split", "sum < 1"),
        (lambda c: c.update(seeds=[1, 2]), "config: seeds", "must include `seed` (0), got [1, 2]"),
        (lambda c: c.update(seeds=[0, 0]), "config: seeds", "has non-unique elements"),
        (lambda c: c["foundation"].update(arch="resnet"), "config: foundation.arch", "is not one of"),
        (lambda c: c["foundation"].update(pool=None), "config: foundation", "set `pool`"),
        (lambda c: c["demo"].update(enabled=False), "config: tasks[0].dataset", "is not an MSD dataset folder"),
        (
            lambda c: c["foundation"].update(checkpoint="/nonexistent/m.pt"),
            "config: foundation.checkpoint",
            "does not exist",
        ),
        # the loss-landscape checks (once in analysis_common.smk, which validate_config never ran)
        (
            lambda c: c["methods"].update(medseqft={"enabled": False}),
            "config: analysis.landscape.methods",
            "['medseqft'] are not enabled",
        ),
        (
            lambda c: c["analysis"]["landscape"].update(methods=["sequential_ft_2x"]),
            "config: analysis.landscape.methods",
            "['sequential_ft_2x'] are not enabled",
        ),
        (
            lambda c: c["analysis"]["landscape"].update(task="unseen"),
            "config: analysis.landscape.task",
            "is not a task of `order`",
        ),
        (
            lambda c: c["analysis"]["landscape"].update(step="nope"),
            "config: analysis.landscape.step",
            "is not a step of `order`",
        ),
        (
            lambda c: c["analysis"]["landscape"].update(task="tubular", step="organ_lesion"),
            "config: analysis.landscape.step",
            "has not learned task 'tubular' yet",
        ),
    ],
)
def test_bad_config_names_the_key(
    mutate: Any, key: str, problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # relative dataset paths resolve against the working folder: an empty one, so that a demo run
    # left in the checkout (its demo/ folder) cannot change the verdict
    monkeypatch.chdir(tmp_path)
    config = demo_config()
    mutate(config)
    with pytest.raises(InputError) as err:
        validate_config(copy.deepcopy(config))
    assert err.value.where == key
    assert problem in err.value.problem


def test_load_config_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(InputError, match="broken.yaml"):
        load_config(bad)


def test_landscape_of_parallel_methods_only_may_map_an_earlier_step() -> None:
    config = demo_config()
    config["analysis"]["landscape"].update(methods=["parallel_ft"], task="tubular", step="organ_lesion")
    validate_config(config)  # parallel models are mapped at the task itself: the step does not matter


def test_landscape_checks_skip_a_switched_off_analysis() -> None:
    config = demo_config()
    config["analysis"]["landscape"].update(enabled=False, methods=["sequential_ft_2x"])
    validate_config(config)
