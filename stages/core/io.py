"""Atomic file writing, hashing and provenance: every artifact is complete or absent, and says where it came from.

Every writer here goes to a temporary name in the destination folder, flushes and fsyncs, then renames
into place, so a job killed at any moment leaves the old file, the complete new one, or nothing.
Tables are Parquet with a ``segadapt`` JSON provenance record in the schema metadata; other artifacts
(safetensors, ``.npy``, NIfTI) get the same record in a sidecar or in their own metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PROVENANCE_KEY",
    "atomic_path",
    "build_folder",
    "canonical_json",
    "config_hash",
    "make_provenance",
    "read_json",
    "read_parquet",
    "read_provenance",
    "save_json",
    "save_nifti",
    "save_npy",
    "save_safetensors",
    "load_safetensors",
    "sha256_file",
    "write_parquet",
]

PROVENANCE_KEY = "segadapt"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Args:
        path: the final destination.
        suffix: suffix of the temporary file (defaults to the destination's, so writers that pick a
            format from the extension, like nibabel, still work).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(final.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{sfx}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; artifacts get the ordinary permissions the umask allows
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, the basis of every hash of settings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def config_hash(settings: Any) -> str:
    """SHA-256 (hex, first 16 characters) of the canonical JSON of the settings a stage received."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_provenance(
    stage: str,
    settings: Any = None,
    inputs: Sequence[str | os.PathLike[str]] | Mapping[str, str] = (),
    seed: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The provenance record written into every artifact.

    Args:
        stage: the stage module that made the artifact (``preprocess``, ``train`` ...).
        settings: the settings the stage received; hashed into ``config_hash``.
        inputs: input files (hashed here) or an already computed mapping ``path -> sha256``.
        seed: the seed used, if any.
        extra: further JSON-serialisable fields (model id, method, task ...).

    No timestamps: a rerun with the same inputs must give byte-identical artifacts.
    """
    from stages import __version__
    from stages.core.codehash import code_hash

    if isinstance(inputs, Mapping):
        input_hashes = dict(inputs)
    else:
        input_hashes = {str(p): sha256_file(p) for p in inputs}
    record = {
        "stage": stage,
        "config_hash": config_hash(settings),
        "settings": settings,
        "inputs": input_hashes,
        "seed": seed,
        "code_version": f"{__version__}+{code_hash(stage)[:12]}",
    }
    record.update(extra)
    return json.loads(canonical_json(record))


def write_parquet(df: Any, path: str | os.PathLike[str], provenance: Mapping[str, Any]) -> None:
    """Write a pandas DataFrame (or pyarrow Table) to Parquet atomically, provenance in the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PROVENANCE_KEY.encode()] = canonical_json(dict(provenance)).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike[str]) -> Any:
    """Read a Parquet table into pandas."""
    import pandas as pd

    return pd.read_parquet(path)


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The provenance record of an artifact: Parquet metadata, safetensors metadata, or a JSON sidecar."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.read_schema(p).metadata or {}
        raw = meta.get(PROVENANCE_KEY.encode())
        return json.loads(raw) if raw else {}
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(PROVENANCE_KEY)
        return json.loads(raw) if raw else {}
    if p.suffix == ".json":
        return dict(read_json(p).get("provenance", {}))
    sidecar = p.with_name(p.name + ".prov.json")
    return read_json(sidecar) if sidecar.exists() else {}


def save_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, sort_keys=True, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def save_npy(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write an uncompressed ``.npy`` (memory-mappable) atomically."""
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def save_nifti(image: Any, path: str | os.PathLike[str]) -> None:
    """Write a nibabel image atomically (the temporary name keeps ``.nii.gz`` so nibabel compresses)."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))


def save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], provenance: Mapping[str, Any] | None = None
) -> None:
    """Write torch tensors to safetensors atomically, provenance in the header metadata."""
    from safetensors.torch import save_file

    metadata = {PROVENANCE_KEY: canonical_json(dict(provenance))} if provenance else None
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a safetensors file into a dict of CPU tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def build_folder(out: Path, build: Callable[[Path], Any]) -> Any:
    """Fill a fresh temporary sibling of ``out`` with ``build(tmp)``, then swap it in place of ``out``.

    Whatever ``out`` held before is removed, so the folder holds exactly what this run wrote; if
    ``build`` raises, ``out`` is left as it was. The sibling sits in the same parent, so relative
    symlinks made inside it stay valid after the rename.

    Args:
        out: the folder to (re)create.
        build: writes the folder's content into the path it is given; its return value is returned.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        result = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result
