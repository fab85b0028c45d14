"""Every stage's log is framed: a timestamped first line with inputs, settings and outputs, a last line with the duration."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages.core.io import write_parquet
from stages.core.log import describe_args, format_duration, stage_log

REPO = Path(__file__).resolve().parents[2]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ segadapt INFO "


def _run_like_a_rule(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    """``python -m ... > log 2>&1``, as the rules run a stage; the log's lines."""
    log = cwd / "step.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            timeout=300,
        )
    return proc.returncode, log.read_text().splitlines()


def test_a_stage_log_starts_with_what_it_reads_and_writes_and_ends_done(tmp_path: Path) -> None:
    for task in ("a", "b"):
        write_parquet(
            pd.DataFrame({"case": ["c0"], "split": ["train"]}), tmp_path / task / "manifest.parquet", {"stage": "test"}
        )
    code, lines = _run_like_a_rule(
        ["stages.data_ready", "--manifests", "a/manifest.parquet", "b/manifest.parquet", "--out", "ready.json"],
        tmp_path,
    )
    assert code == 0, lines
    assert re.fullmatch(
        STAMP + r"stages\.data_ready start \| inputs: --manifests=a/manifest\.parquet "
        r"b/manifest\.parquet \| settings: - \| outputs: --out=ready\.json",
        lines[0],
    ), lines[0]
    assert re.fullmatch(STAMP + r"stages\.data_ready done in \d+\.\d s", lines[-1]), lines[-1]
    assert (tmp_path / "ready.json").is_file()


def test_a_refusal_ends_the_log_with_failed_and_the_error(tmp_path: Path) -> None:
    settings = {"overlap": 0.5, "device": "cpu"}
    code, lines = _run_like_a_rule(
        [
            "stages.fisher",
            "--model",
            "models/m",
            "--task",
            "t",
            "--data",
            "data/t",
            "--out",
            "pred",
            "--settings",
            json.dumps(settings),
        ],
        tmp_path,
    )
    assert code == 2
    first = lines[0]
    assert re.match(STAMP + r"stages\.fisher start \| ", first), first
    assert "| inputs: --model=models/m --data=data/t |" in first
    assert '| settings: --task=t --settings={"device":"cpu","overlap":0.5} |' in first
    assert first.endswith("| outputs: --out=pred")
    assert re.fullmatch(STAMP + r"stages\.fisher failed after \d+\.\d s \((Input|Settings)Error\)", lines[-2]), lines[
        -2
    ]
    assert lines[-1].startswith("segadapt: error: ")


def test_describe_args_sorts_paths_settings_and_outputs() -> None:
    args = argparse.Namespace(
        init=Path("m0"),
        data=[Path("a"), Path("b")],
        buffer=[(Path("s.parquet"), Path("d"))],
        teacher=None,
        pseudo=[],
        recipe="retention",
        settings={"lr": 0.1},
        out=Path("o"),
        work=Path("w"),
        round=2,
        quiet=False,
    )
    parts = describe_args(args)
    assert parts == {
        "inputs": ["--init=m0", "--data=a b", "--buffer=s.parquet:d"],
        "settings": ["--recipe=retention", '--settings={"lr":0.1}', "--round=2", "--quiet=false"],
        "outputs": ["--out=o", "--work=w"],
    }
    assert describe_args(argparse.Namespace(settings='{"b": 1, "a": [2]}'))["settings"] == [
        '--settings={"a":[2],"b":1}'
    ]
    assert describe_args(argparse.Namespace(settings="{not json"))["settings"] == ["--settings={not json"]
    assert describe_args(argparse.Namespace(inbox=Path("i")), outputs=("inbox",))["outputs"] == ["--inbox=i"]


def test_format_duration() -> None:
    assert format_duration(0.04) == "0.0 s"
    assert format_duration(12.34) == "12.3 s"
    assert format_duration(754.0) == "754.0 s (0:12:34)"
    assert format_duration(3 * 3600 + 61.6) == "10861.6 s (3:01:02)"


def test_stage_log_in_process(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segadapt")
    with stage_log("python -m stages.x", argparse.Namespace(out=Path("o"))):
        pass
    with pytest.raises(SystemExit), stage_log("python -m stages.x", argparse.Namespace()):
        sys.exit(1)
    with pytest.raises(SystemExit), stage_log("python -m stages.x", argparse.Namespace()):
        sys.exit(0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "stages.x start | inputs: - | settings: - | outputs: --out=o"
    assert re.fullmatch(r"stages\.x done in \d\.\d s", messages[1])
    assert re.fullmatch(r"stages\.x failed after \d\.\d s \(exit status 1\)", messages[3])
    assert re.fullmatch(r"stages\.x done in \d\.\d s", messages[5])


def test_every_stage_main_is_framed() -> None:
    """Each `python -m stages.<step>` main() runs its work inside stage_log (one helper, not 19 copies)."""
    missing = []
    for path in sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        if not mains or path.stem == "audit":  # the audit is a report tool for a person, not a pipeline step
            continue
        uses = [
            w
            for w in ast.walk(mains[0])
            if isinstance(w, ast.With)
            and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "stage_log"
                for i in w.items
            )
        ]
        if not uses:
            missing.append(path.name)
    assert not missing, f"main() without stage_log: {missing}"


NO_WRITABLE_WARNING = """
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from stages.core.inference import predict_probabilities
from stages.core.nets import FoundationNet
from stages.core.ssl import make_views, pooled_case_feature, score_case

# torch says "not writable" once per process and is silent afterwards: each check runs in a fresh one
warnings.simplefilter("error")
folder = Path(sys.argv[1])
np.save(folder / "case.npy", np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32))
image = np.load(folder / "case.npy", mmap_mode="r")
assert not image.flags.writeable
net = FoundationNet("basicunet", arch_kwargs={"features": [4, 4, 8, 8, 16, 4]}, ssl={"patch_size": [16, 16, 16]},
                    heads={"t": 2}, seed=0)
check = sys.argv[2]
if check == "inference":
    out = predict_probabilities(net, "t", image, (16, 16, 16), 0.5, 2)
    assert np.array_equal(out, predict_probabilities(net, "t", np.array(image), (16, 16, 16), 0.5, 2))
elif check == "views":
    make_views(image, 2, 16, 0.3, 4, torch.Generator().manual_seed(0))
elif check == "score":
    score_case(net, image, 2, 16, 0.3, 4, 0, "c0", 2)
elif check == "feature":
    pooled_case_feature(net, image, 16)
assert not image.flags.writeable
print("ok", check)
"""


@pytest.mark.parametrize("check", ["inference", "views", "score", "feature"])
def test_memory_mapped_cases_reach_torch_without_the_not_writable_warning(tmp_path: Path, check: str) -> None:
    """The cases are opened read-only (mmap_mode="r"); handed to torch as they are, torch warned "not writable"."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_WRITABLE_WARNING, str(tmp_path), check],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"ok {check}", proc.stderr[-3000:]


def test_ssl_scoring_progress_bar_has_a_total(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from stages import ssl_scores
    from stages.core.nets import FoundationNet, save_model

    data = tmp_path / "data"
    (data / "cases").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = ["c0", "c1", "c2"]
    for case in cases:
        np.save(data / "cases" / f"{case}.npy", rng.normal(size=(1, 16, 16, 16)).astype(np.float32))
    write_parquet(pd.DataFrame({"case": cases, "split": ["train"] * 3}), data / "manifest.parquet", {"stage": "test"})
    net = FoundationNet(
        "basicunet", arch_kwargs={"features": [4, 4, 8, 8, 16, 4]}, ssl={"patch_size": [16, 16, 16]}, seed=0
    )
    save_model(net, tmp_path / "m0", {"stage": "test"})
    settings = {
        "passes": 2,
        "batch": 2,
        "seed": 0,
        "ssl": {"patch_size": 16, "mask_ratio": 0.3, "mask_patch": 4},
        "device": "cpu",
    }
    ssl_scores.run(tmp_path / "m0", data, tmp_path / "ssl.parquet", settings)
    err = capsys.readouterr().err
    assert "ssl scoring: 100%" in err and "3/3 [" in err, err[-500:]
    assert pd.read_parquet(tmp_path / "ssl.parquet")["case"].tolist() == cases
