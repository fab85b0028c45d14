"""The README's "Your own data" steps, literally: a user's config file gets no demo keys.

`snakemake --configfile my.yaml` once deep-merged my.yaml into the demo's config.yaml, so a user's
run inherited the demo's tasks and ASSFT target and stopped with "assft.target: names no task in
tasks: 'unseen'". The test takes the README's YAML block and commands as they are, points the
placeholder folders at small MSD datasets it makes, and runs them.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from conftest import REPO, SNAKEFILE

SHAPE = (16, 16, 12)


def own_data_section() -> tuple[str, list[str]]:
    """The README's own-data YAML block and its bash commands."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own data") : readme.index("## Layout")]
    (config,) = re.findall(r"```yaml\n(.+?)```", section, flags=re.S)
    commands = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.+?)```", section, flags=re.S)
        for line in block.splitlines()
        if "my.yaml" in line
    ]
    return config, commands


def make_msd(root: Path, n: int, seed: int, labelled: bool = True) -> Path:
    """An MSD folder of ``n`` small cases (a bright blob, labelled 1)."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n):
        image = rng.normal(100, 10, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        x = 3 + i % 5
        label[x : x + 6, 4:10, 3:8] = 1
        image[label == 1] += 80
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"case_{i:03d}.nii.gz"))
        entry = {"image": f"./imagesTr/case_{i:03d}.nii.gz"}
        if labelled:
            (root / "labelsTr").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
            entry["label"] = f"./labelsTr/case_{i:03d}.nii.gz"
        entries.append(entry)
    meta = {
        "name": root.name,
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ"},
        "numTraining": n,
        "training": entries if labelled else [],
        "test": [] if labelled else [e["image"] for e in entries],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_readme_own_data_steps_run_without_the_demo_keys(tmp_path: Path) -> None:
    config_text, commands = own_data_section()
    assert commands == ["snakemake --cores N --configfile my.yaml -n", "snakemake --cores N --configfile my.yaml"]
    # the placeholders of the README's block, each replaced by a folder made here
    placeholders = sorted(set(re.findall(r"/data/\w+", config_text)))
    assert placeholders == ["/data/Task03_Liver", "/data/Task07_Pancreas", "/data/Task09_Spleen", "/data/unlabelled"]
    data = tmp_path / "data"
    for seed, name in enumerate(placeholders):
        make_msd(data / name.rsplit("/", 1)[1], n=10, seed=seed, labelled=name != "/data/unlabelled")
        config_text = config_text.replace(name, str(data / name.rsplit("/", 1)[1]))
    work = tmp_path / "work"
    work.mkdir()
    (work / "my.yaml").write_text(config_text)
    assert "demo" not in yaml.safe_load(config_text)

    # the check command, as the README gives it (N = 2): a dry run that validates and lists the jobs
    argv = shlex.split(commands[0].replace("--cores N", "--cores 2"))
    cmd = [sys.executable, "-m", *argv[:1], "-s", str(SNAKEFILE), *argv[1:]]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # the user's tasks and target, never the demo's
    for job in ("preprocess_task", "pretrain_foundation", "query_round"):
        assert job in out
    assert "organ_lesion" not in out and "unseen" not in out and "demo/" not in out
    assert "tasks/spleen" in out or "spleen" in out

    # the run itself, up to the validated data: the user's folders preprocessed, no demo made
    argv = shlex.split(commands[1].replace("--cores N", "--cores 2"))
    cmd = [sys.executable, "-m", *argv[:1], "-s", str(SNAKEFILE), "results/data/ready.json", *argv[1:]]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ready = json.loads((work / "results" / "data" / "ready.json").read_text())
    assert "liver" in json.dumps(ready) and "spleen" in json.dumps(ready)
    assert not (work / "demo").exists()
