"""Atomic writers leave the old file, the complete new one, or nothing; provenance round-trips."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stages.core import io


def test_parquet_provenance_round_trip(tmp_path: Path) -> None:
    prov = io.make_provenance("aggregate", {"a": 1}, inputs=[], seed=3, method="m")
    io.write_parquet(pd.DataFrame({"x": [1, 2]}), tmp_path / "t.parquet", prov)
    back = io.read_provenance(tmp_path / "t.parquet")
    assert back["seed"] == 3 and back["method"] == "m" and back["stage"] == "aggregate"
    assert back["config_hash"] == io.config_hash({"a": 1})
    assert back["code_version"].startswith("0.1.0+")
    assert io.read_parquet(tmp_path / "t.parquet")["x"].tolist() == [1, 2]


def test_provenance_hashes_inputs(tmp_path: Path) -> None:
    src = tmp_path / "in.txt"
    src.write_text("hello")
    prov = io.make_provenance("aggregate", None, inputs=[src])
    assert prov["inputs"][str(src)] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    prov = io.make_provenance("aggregate", {"k": [1, 2]})
    for name in ("a", "b"):
        io.write_parquet(pd.DataFrame({"x": [0.5, 1.5]}), tmp_path / f"{name}.parquet", prov)
        io.save_safetensors({"w": torch.arange(4.0)}, tmp_path / f"{name}.safetensors", prov)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert io.read_provenance(tmp_path / "a.safetensors")["stage"] == "aggregate"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.npy"
    io.save_npy(np.zeros(3), target)
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert np.load(target).tolist() == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


WRITER = """
import sys, numpy as np
from stages.core.io import save_npy
print("start", flush=True)
save_npy(np.ones(60_000_000, dtype=np.float32), sys.argv[1])
print("done", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_writer_leaves_old_or_nothing(tmp_path: Path, sig: int) -> None:
    """Kill a process while it writes a 240 MB array: the destination is never a truncated file."""
    target = tmp_path / "big.npy"
    io.save_npy(np.arange(5, dtype=np.float32), target)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    # wait until the temporary file exists and is growing, then kill mid-write
    deadline = time.time() + 20
    while time.time() < deadline and not any(p.name.startswith(".big.npy.") for p in tmp_path.iterdir()):
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    proc.wait()
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]  # the old complete file is still there
