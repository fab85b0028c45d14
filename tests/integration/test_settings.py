"""The settings contract: one parser, unknown and missing keys refused, the schema the one source of defaults."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY, make_workdir, snakemake

from stages.core.config import SCHEMA_PATH, validate_config
from stages.core.errors import InputError
from stages.core.settings import SettingsError, add_settings_argument, from_mapping, setting, settings_help
from stages.core.strategies import STRATEGIES

#: every stage module whose settings are a dataclass contract
STAGES = ("train", "query_round", "annotate", "select_pseudo", "evaluate", "features", "ssl_scores", "pretrain")
#: stages on the shared parser and from_mapping whose dataclasses keep schema-equal defaults
OTHER_STAGES = ("select_buffer", "drift", "plots", "import_checkpoint")
#: stages on the shared parser that still check a plain mapping (defaults in DEFAULT_SETTINGS or their own class)
PARSER_ONLY = ("preprocess", "synth", "landscape", "merge")
CORE = ("stages.core.trainer", "stages.core.strategies")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
    rank: int = setting(help="a rank")
    alpha: float = setting(1.0, help="a scale")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    steps: int = setting(help="updates")
    name: str | None = setting(None, help="optional")
    inner: _Inner = setting(help="nested")


def test_from_mapping_builds_nested_dataclasses() -> None:
    out = from_mapping(_Outer, {"steps": 3, "inner": {"rank": 2}}, "toy")
    assert out == _Outer(steps=3, inner=_Inner(rank=2, alpha=1.0))
    assert from_mapping(_Outer, {"steps": 3, "name": "x", "inner": {"rank": 2, "alpha": 2}}, "toy").inner.alpha == 2


@pytest.mark.parametrize(
    ("mapping", "where", "message"),
    [
        ({"steps": 3, "inner": {"rank": 2}, "stpes": 1}, "--settings", r"toy: unknown settings \['stpes'\]"),
        ({"inner": {"rank": 2}}, "--settings", r"toy: missing settings \['steps'\]"),
        ({"steps": 3, "inner": {}}, "--settings.inner", r"toy: missing settings \['rank'\]"),
        ({"steps": 3, "inner": {"rank": 2, "beta": 0}}, "--settings.inner", r"unknown settings \['beta'\]"),
        ({"steps": "3", "inner": {"rank": 2}}, "--settings.steps", "expected int, got '3'"),
        ({"steps": True, "inner": {"rank": 2}}, "--settings.steps", "expected int"),
        ({"steps": 3, "inner": {"rank": 2.5}}, "--settings.inner.rank", "expected int"),
        ([1, 2], "--settings", "must be an object"),
    ],
)
def test_from_mapping_refuses_by_stage_and_key(mapping: Any, where: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as err:
        from_mapping(_Outer, mapping, "toy")
    assert err.value.where == where and isinstance(err.value, InputError)


def test_one_settings_parser_for_every_stage() -> None:
    parser = argparse.ArgumentParser()
    add_settings_argument(parser, _Outer)
    assert parser.parse_args(["--settings", '{"a": 1}']).settings == {"a": 1}
    assert parser.parse_args([]).settings == {}
    with pytest.raises(InputError, match="not valid JSON"):
        parser.parse_args(["--settings", "{a: 1}"])
    with pytest.raises(InputError, match="must be a JSON object, got list"):
        parser.parse_args(["--settings", "[1]"])
    for stage in STAGES + OTHER_STAGES + PARSER_ONLY:
        source = (Path(importlib.import_module(f"stages.{stage}").__file__)).read_text()
        assert "add_settings_argument(parser" in source and "json.loads" not in source, stage


def test_help_names_every_field() -> None:
    rows = settings_help(_Outer)
    assert [r[0] for r in rows] == ["steps", "name", "inner"] and rows[0][1] == "required" and rows[1][1] == "None"


def _contracts() -> list[type]:
    found: dict[str, type] = {}
    for name in [f"stages.{s}" for s in STAGES + OTHER_STAGES] + list(CORE):
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and any("help" in f.metadata for f in dataclasses.fields(value))
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


def _schema_node(schema: dict, dotted: str) -> dict:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_every_field_is_documented_and_its_schema_key_exists() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    contracts = _contracts()
    assert len(contracts) >= 15
    for cls in contracts:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__qualname__}.{f.name} has no help text"
            if "schema" in f.metadata:
                _schema_node(schema, f.metadata["schema"])  # KeyError names a key the schema lacks


def test_dataclass_defaults_equal_the_schema_defaults() -> None:
    """The schema is the one source of pipeline defaults: a default kept for direct callers must agree."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    compared = []
    for cls in _contracts():
        for f in dataclasses.fields(cls):
            if "schema" not in f.metadata or f.default is dataclasses.MISSING:
                continue
            node = _schema_node(schema, f.metadata["schema"])
            assert "default" in node, f.metadata["schema"]
            assert f.default == node["default"], f"{cls.__qualname__}.{f.name}: {f.default!r} vs {node['default']!r}"
            compared.append(f.metadata["schema"])
    # the trainer's defaults are the schema's (they once were lr 1e-3 and checkpoint_every 25)
    assert {"train.lr", "train.checkpoint_every", "train.weight_decay"} <= set(compared)


@pytest.mark.parametrize(
    ("stage", "keys"),
    [
        (
            "preprocess",
            {
                "split": "preprocess.split",
                "target_spacing": "preprocess.target_spacing",
                "normalisation": "preprocess.normalisation",
                "max_voxels": "preprocess.max_voxels",
                "seed": "seed",
            },
        ),
        (
            "synth",
            {
                "seed": "demo.seed",
                "shape": "demo.shape",
                "cases_per_task": "demo.cases_per_task",
                "pool_cases": "demo.pool_cases",
            },
        ),
    ],
)
def test_default_settings_dicts_equal_the_schema(stage: str, keys: dict[str, str]) -> None:
    """The stages that keep a DEFAULT_SETTINGS dict for direct callers agree with the schema too."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    defaults = importlib.import_module(f"stages.{stage}").DEFAULT_SETTINGS
    for key, dotted in keys.items():
        node = _schema_node(schema, dotted)
        expected = node["default"]
        if node.get("type") == "object" and "properties" in node:  # an object's default is its members'
            expected = {k: v["default"] for k, v in node["properties"].items()}
        assert defaults[key] == expected, f"{stage}.{key}: {defaults[key]!r} vs {dotted} {expected!r}"


def test_strategy_registry_matches_the_schema() -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assft = schema["properties"]["assft"]["properties"]
    assert sorted(assft["strategies"]["items"]["enum"]) == sorted(STRATEGIES)
    assert sorted(assft["strategies"]["default"]) == sorted(STRATEGIES)
    options = assft["options"]["properties"]
    with_options = {n for n, s in STRATEGIES.items() if dataclasses.fields(s.settings)}
    assert set(options) == with_options
    for name in with_options:
        fields = dataclasses.fields(STRATEGIES[name].settings)
        assert set(options[name]["properties"]) == {f.name for f in fields}, name
        for f in fields:
            assert f.metadata["schema"] == f"assft.options.{name}.{f.name}"
            assert "description" in options[name]["properties"][f.name]


def test_moved_assft_option_is_refused_with_its_new_place() -> None:
    config = yaml.safe_load(TINY.read_text())
    config["assft"]["fg_share"] = 0.5
    with pytest.raises(InputError, match=r"assft.fg_share: has moved: set assft.options.fg_random.share"):
        validate_config(config, check_paths=False)
    config["assft"].pop("fg_share")
    config["assft"]["options"] = {"fg_random": {"share": 0.5}, "mc_dropout": {"measure": "mutual_information"}}
    out = validate_config(config, check_paths=False)
    assert out["assft"]["options"]["mc_dropout"] == {"passes": 8, "dropout": 0.2, "measure": "mutual_information"}


def _contract_of(stage: str, args: list[str]) -> type:
    if stage == "train":
        from stages.train import RECIPE_SETTINGS

        return RECIPE_SETTINGS[args[args.index("--recipe") + 1]]
    contract = {
        "query_round": "QuerySettings",
        "annotate": "AnnotateSettings",
        "select_pseudo": "PseudoSettings",
        "evaluate": "EvaluateSettings",
        "features": "FeatureSettings",
        "ssl_scores": "ScoreSettings",
        "pretrain": "PretrainSettings",
        "select_buffer": "BufferSettings",
        "import_checkpoint": "ImportSettings",
        "drift": "DriftSettings",
        "plots": "PlotSettings",
    }[stage]
    return getattr(importlib.import_module(f"stages.{stage}"), contract)


def test_every_job_of_the_tiny_dag_receives_exactly_its_contract(tmp_path: Path) -> None:
    """The dry run's --settings of each job parse under its stage's contract: no key missing, none unknown."""
    config = yaml.safe_load(TINY.read_text())
    config["assft"]["options"] = {"mc_dropout": {"passes": 3}}
    config["assft"]["strategies"] = list(config["assft"]["strategies"]) + ["mc_dropout", "coreset"]
    work = make_workdir(tmp_path / "w", config)
    proc = snakemake(work, "-n", "-p")
    checked: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        found = re.search(r"python -m stages\.(\w+) (.*?) > ", line)
        if not found or found.group(1) not in STAGES + OTHER_STAGES:
            continue
        stage, args = found.group(1), shlex.split(found.group(2))
        settings = json.loads(args[args.index("--settings") + 1])
        from_mapping(_contract_of(stage, args), settings, stage)
        if stage == "query_round":
            strategy = STRATEGIES[settings["strategy"]]
            from_mapping(strategy.settings, settings["options"], stage)
            if settings["strategy"] == "mc_dropout":
                assert settings["options"] == {"dropout": 0.2, "measure": "monailabel", "passes": 3}
        checked[stage] = checked.get(stage, 0) + 1
    # the tiny DAG pre-trains M0 rather than importing one
    assert set(checked) == set(STAGES + OTHER_STAGES) - {"import_checkpoint"}, checked


def test_landscape_defaults_equal_the_schema() -> None:
    """landscape keeps its own validating class (lists become tuples); its defaults agree with the schema."""
    from stages.landscape import LandscapeSettings

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    default = LandscapeSettings()
    pairs = {
        "dims": "analysis.landscape.dims",
        "points": "analysis.landscape.points",
        "range": "analysis.landscape.range",
        "cases": "analysis.landscape.cases",
        "batch_size": "analysis.landscape.batch_size",
        "patch_size": "train.patch_size",
        "device": "device",
        "dpi": "summary.dpi",
        "seed": "seed",
    }
    for field, dotted in pairs.items():
        value = getattr(default, field)
        value = list(value) if isinstance(value, tuple) else value
        assert value == _schema_node(schema, dotted)["default"], field
