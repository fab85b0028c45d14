"""Validate an MSD dataset, then write its preprocessed arrays and a manifest with a seeded split.

``python -m stages.preprocess --dataset DIR --out DIR --settings JSON`` writes ``out/cases/{case}.npy``
(float32, (1, X, Y, Z)), ``out/cases/{case}_seg.npy`` (uint8 task classes, labelled sets only) and
``out/manifest.parquet`` (columns in docs/design.md; ``array_sha256`` and ``seg_sha256`` hold the SHA-256
of each written ``.npy``, which ``segadapt-audit`` re-checks). Every file is checked before anything is
written; a refused dataset leaves no output.

Settings (defaults in :data:`DEFAULT_SETTINGS`):

- ``labelled`` (bool): read image/label pairs; ``false`` reads every image as an unlabelled pool.
- ``labels`` (list of int or null): the source label values the task keeps, mapped to classes
  1..n in the order given; other values become background. ``null`` keeps every declared
  non-zero label, in ascending order.
- ``seed`` (int): seeds the split (and the voxel sample for CT statistics).
- ``split`` ({"val": float, "test": float}): fractions of the cases. Counts are rounded half up
  (``floor(f * n + 0.5)``); if that leaves no training case, ``val`` and then ``test`` give up cases
  so that at least one remains. Tiny sets may get 0 val / test cases.
- ``target_spacing`` ([x, y, z] mm along canonical R, A, S, or null): null takes the per-axis median
  spacing of all cases.
- ``normalisation`` ("auto" | "ct" | "mr"): auto is ``ct`` for a CT modality in dataset.json, else ``mr``.
- ``holdout`` ({"fraction": float, "keep": "held" | "rest"} or null): a seeded share of the dataset's
  cases (``floor(fraction * n + 0.5)``, chosen by the SHA-256 of seed and case id, so every job on the
  same dataset agrees) held back for pre-training: ``keep: held`` keeps only those (the pool),
  ``keep: rest`` drops them before the split (a task), so M0 never sees a task's case. The target
  spacing's median is still taken over every case, so pool and tasks are resampled alike.
- ``ct_stats`` ({"mean", "std", "p005", "p995"} or null): fixed CT statistics; null computes them from
  the training split's foreground (label > 0), which an unlabelled CT pool does not have, so there
  they are required.
- ``max_voxels`` (int): refuse, before anything is written, a case whose volume resampled to the
  target spacing would exceed this many voxels (a header with a wrong spacing otherwise exhausts
  memory); a case far from the dataset's median size or spacing gets a warning.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from stages.core.errors import InputError, run_cli
from stages.core.geometry import (
    canonical_spacing,
    class_counts,
    ct_statistics,
    foreground_stats,
    median_spacing,
    normalisation_for_modality,
    preprocess_case,
    sample_foreground,
)
from stages.core.io import build_folder, make_provenance, save_npy, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.msd import (
    Dataset,
    ValidatedCase,
    dataset_labels,
    load_nifti_3d,
    mm_text,
    read_dataset,
    validate_dataset,
)
from stages.core.settings import add_settings_argument
from stages.core.split import split_cases

__all__ = ["DEFAULT_SETTINGS", "MANIFEST_SCHEMA", "held_out_cases", "resolve_settings", "split_cases", "run", "main"]

DEFAULT_SETTINGS: dict[str, Any] = {
    "labelled": True,
    "labels": None,
    "seed": 0,
    "split": {"val": 0.2, "test": 0.2},
    "target_spacing": None,
    "normalisation": "auto",
    "ct_stats": None,
    "max_voxels": 100_000_000,
    "holdout": None,
}

#: a case whose resampled size is this many times the dataset's median, or whose spacing is this many
#: times the median along an axis, is reported as suspicious (a header in the wrong unit, a localiser)
OUTLIER_FACTOR = 8.0

# nnU-Net draws 10,000 foreground voxels per training case for its CT statistics
CT_SAMPLES_PER_CASE = 10_000

MANIFEST_SCHEMA = pa.schema(
    [
        ("case", pa.string()),
        ("split", pa.string()),
        ("image_path", pa.string()),
        ("label_path", pa.string()),
        ("image_sha256", pa.string()),
        ("label_sha256", pa.string()),
        # SHA-256 of the preprocessed files cases/{case}.npy and cases/{case}_seg.npy (null: no label)
        ("array_sha256", pa.string()),
        ("seg_sha256", pa.string()),
        ("orig_shape", pa.list_(pa.int64())),
        ("orig_spacing", pa.list_(pa.float64())),
        ("orig_affine", pa.list_(pa.float64())),
        ("orig_axcodes", pa.string()),
        ("crop_box", pa.list_(pa.int64())),
        ("cropped_shape", pa.list_(pa.int64())),
        ("shape", pa.list_(pa.int64())),
        ("spacing", pa.list_(pa.float64())),
        ("intensity_mean", pa.float64()),
        ("intensity_std", pa.float64()),
        ("intensity_p005", pa.float64()),
        ("intensity_p995", pa.float64()),
        ("label_counts", pa.list_(pa.int64())),
        ("num_classes", pa.int64()),
    ]
)


# ------------------------------------------------------------------------------------------ settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the settings and fill in defaults; raise :class:`InputError` naming the bad key.

    Args:
        settings: the ``--settings`` object (see the module docstring).
    """
    if not isinstance(settings, Mapping):
        raise InputError("settings", f"must be a JSON object, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise InputError("settings", f"unknown keys {unknown} (known: {sorted(DEFAULT_SETTINGS)})")
    out = {**DEFAULT_SETTINGS, **settings}
    out["split"] = {**DEFAULT_SETTINGS["split"], **(settings.get("split") or {})}

    if not isinstance(out["labelled"], bool):
        raise InputError("settings.labelled", f"must be true or false, got {out['labelled']!r}")
    if not _is_int(out["seed"]):
        raise InputError("settings.seed", f"must be an integer, got {out['seed']!r}")
    labels = out["labels"]
    if labels is not None:
        if not isinstance(labels, list) or not labels or not all(_is_int(v) for v in labels):
            raise InputError("settings.labels", f"must be null or a non-empty list of integers, got {labels!r}")
        if 0 in labels or len(set(labels)) != len(labels):
            raise InputError("settings.labels", f"must list distinct non-zero label values, got {labels}")
    holdout = out["holdout"]
    if holdout is not None:
        if not isinstance(holdout, Mapping) or set(holdout) != {"fraction", "keep"}:
            raise InputError("settings.holdout", f"must be null or {{fraction, keep}}, got {holdout!r}")
        if (
            isinstance(holdout["fraction"], bool)
            or not isinstance(holdout["fraction"], (int, float))
            or not 0 <= holdout["fraction"] < 1
        ):
            raise InputError("settings.holdout.fraction", f"must be in [0, 1), got {holdout['fraction']!r}")
        if holdout["keep"] not in ("held", "rest"):
            raise InputError("settings.holdout.keep", f"must be 'held' or 'rest', got {holdout['keep']!r}")
    split = out["split"]
    if set(split) - {"val", "test"}:
        raise InputError("settings.split", f"unknown keys {sorted(set(split) - {'val', 'test'})} (known: val, test)")
    for key in ("val", "test"):
        if not _is_number(split[key]) or not 0 <= split[key] < 1:
            raise InputError(f"settings.split.{key}", f"must be a fraction in [0, 1), got {split[key]!r}")
    if split["val"] + split["test"] >= 1:
        raise InputError("settings.split", f"val + test must be below 1 to leave training cases, got {split}")
    spacing = out["target_spacing"]
    if spacing is not None and (
        not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(v) and v > 0 for v in spacing)
    ):
        raise InputError("settings.target_spacing", f"must be null or 3 positive numbers (mm), got {spacing!r}")
    if out["normalisation"] not in ("auto", "ct", "mr"):
        raise InputError("settings.normalisation", f"must be 'auto', 'ct' or 'mr', got {out['normalisation']!r}")
    if not _is_int(out["max_voxels"]) or out["max_voxels"] < 1:
        raise InputError("settings.max_voxels", f"must be a positive integer, got {out['max_voxels']!r}")
    stats = out["ct_stats"]
    if stats is not None:
        keys = ("mean", "std", "p005", "p995")
        if not isinstance(stats, Mapping) or set(stats) != set(keys) or not all(_is_number(stats[k]) for k in keys):
            raise InputError("settings.ct_stats", f"must be null or an object with numbers {list(keys)}, got {stats!r}")
        if stats["std"] <= 0 or stats["p005"] > stats["p995"]:
            raise InputError("settings.ct_stats", f"needs std > 0 and p005 <= p995, got {dict(stats)}")
    return out


# -------------------------------------------------------------------------------------------- helpers


def _label_map(dataset: Dataset, labels: dict[int, str], kept: list[int] | None) -> dict[int, int]:
    if kept is None:
        kept = sorted(v for v in labels if v != 0)
    missing = [v for v in kept if v not in labels]
    if missing:
        raise InputError("settings.labels", f"values {missing} are not labels of {dataset.root} (labels: {labels})")
    return {source: cls for cls, source in enumerate(kept, start=1)}


# Validation keeps up to this many bytes of the arrays it read (MSD Hippocampus: 68 MiB in all), so
# small datasets are decompressed once; larger ones read each file again (a few cases stay kept).
_KEEP_VOXELS_BYTES = 256 << 20


def _voxels(case: ValidatedCase, key: str, last_use: bool) -> np.ndarray:
    """The 3D array validation kept under ``key`` (popped on its ``last_use``), else read from the file.

    The files were validated (gzip CRC included) just before, so they are read without a second check.
    """
    data = case.voxels.pop(key, None) if last_use else case.voxels.get(key)
    if data is None:
        path = case.image if key == "image" else case.label
        assert path is not None
        _, data = load_nifti_3d(path, verify=False)  # 3D: trailing singleton axes dropped
    return data


class _Image(NamedTuple):
    """What preprocess_case reads of an image; a NIfTI image would build (and check) a header per case."""

    dataobj: np.ndarray
    affine: np.ndarray


def _load_image(case: ValidatedCase, last_use: bool = True) -> tuple[_Image, np.ndarray]:
    """The image as stored (scaled) and its voxels; preprocess_case makes the float32 copy it needs."""
    data = _voxels(case, "image", last_use)
    return _Image(data, case.affine), data


def _load_label(case: ValidatedCase, last_use: bool = True) -> np.ndarray:
    assert case.label is not None
    data = _voxels(case, "label", last_use)
    # validation checked the values are whole numbers; float32 labels (two MSD cases) are cast here.
    # Integer labels keep their dtype (uint8 as a rule): int64 would be 8 bytes a voxel.
    return np.rint(data).astype(np.int64) if data.dtype.kind == "f" else data


def _dataset_ct_stats(cases: list[ValidatedCase], seed: int) -> dict[str, float]:
    rng = np.random.default_rng([seed, 1])  # its own stream, independent of the split's
    samples = []
    for case in tqdm(cases, desc="CT statistics", mininterval=2):
        raw = _voxels(case, "image", last_use=False)  # the preprocessing loop reads them again
        samples.append(sample_foreground(raw, _load_label(case, last_use=False) > 0, CT_SAMPLES_PER_CASE, rng))
    if not any(s.size for s in samples):
        where = cases[0].label if cases else "settings.split"
        raise InputError(where, "the training cases have no foreground voxels to compute CT statistics from")
    return ct_statistics(samples)


class _BackgroundWriter:
    """Writes the case arrays (atomic ``save_npy``) on one thread while the next case is computed.

    Every atomic write ends in an fsync that waits on the disk: an atomic ``save_npy`` took 1.3-1.7 ms
    a file on the shared machine the benchmarks ran on (``np.save`` alone 0.6-0.75 ms), a third of
    the step's time on MSD Hippocampus. The thread overlaps that wait with the next case's work.
    At most ``depth`` writes and ``max_bytes`` of arrays are in flight (a larger array is waited for
    at once), so memory stays what it was; a failed write is raised by a later ``write`` or on
    leaving the ``with`` block, which waits for every write.
    """

    # A write is a string of short system calls, and after each the thread needs the GIL back: with
    # Python's default 5 ms switch interval it waits behind the computing thread almost every time
    # (the step ran 17 % faster with this interval on MSD Hippocampus). Restored on leaving.
    SWITCH_INTERVAL_S = 2e-4

    def __init__(self, depth: int = 64, max_bytes: int = 64 << 20) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess-writer")
        self._switch_interval = sys.getswitchinterval()
        self._pending: deque[tuple[Future[str], int]] = deque()
        self._bytes = 0
        self._depth = depth
        self._max_bytes = max_bytes

    def write(self, array: np.ndarray, path: Path) -> Future[str]:
        """Queue ``save_npy(array, path)``; the caller must not change ``array`` afterwards.

        Returns:
            A future of the written file's SHA-256, hashed by the writer thread right after the write
            (the bytes are still in the page cache; hashlib releases the GIL while it hashes).
        """
        future = self._pool.submit(_save_and_hash, array, path)
        self._pending.append((future, array.nbytes))
        self._bytes += array.nbytes
        while self._pending and (len(self._pending) > self._depth or self._bytes > self._max_bytes):
            self._wait_oldest()
        return future

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._bytes -= nbytes
        future.result()

    def __enter__(self) -> _BackgroundWriter:
        sys.setswitchinterval(min(self._switch_interval, self.SWITCH_INTERVAL_S))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            while self._pending:
                if exc[0] is None:
                    self._wait_oldest()
                else:  # already failing: let the writes finish, keep the first error
                    self._pending.popleft()[0].exception()
        finally:
            self._pool.shutdown(wait=True)
            sys.setswitchinterval(self._switch_interval)


def _shape_text(case: ValidatedCase) -> str:
    return f"{'x'.join(str(s) for s in case.shape)} voxels at {mm_text(canonical_spacing(case.affine))} mm"


def _check_sizes(
    ds: Dataset,
    cases: Sequence[ValidatedCase],
    spacings: Sequence[Sequence[float]],
    target: Sequence[float],
    max_voxels: int,
) -> None:
    """Refuse cases whose resampled volume would exceed ``max_voxels``; warn about size/spacing outliers."""
    resampled = [math.prod(c.shape) * math.prod(sp) / math.prod(target) for c, sp in zip(cases, spacings, strict=True)]
    too_big = [
        f"  {c.image}: {_shape_text(c)} would become ~{n / 1e6:.0f} M voxels at {mm_text(target)} mm "
        f"(limit {max_voxels / 1e6:.0f} M)"
        for c, n in zip(cases, resampled, strict=True)
        if n > max_voxels
    ]
    if too_big:
        raise InputError(
            ds.root,
            f"{len(too_big)} case(s) too large once resampled (a wrong spacing in the "
            f"header? else raise preprocess.max_voxels):\n" + "\n".join(too_big),
        )
    median_size = float(np.median(resampled))
    median_sp = np.median(np.asarray(spacings, dtype=np.float64), axis=0)
    for c, n, sp in zip(cases, resampled, spacings, strict=True):
        ratio = float(np.max(np.maximum(np.asarray(sp) / median_sp, median_sp / np.asarray(sp))))
        if n > OUTLIER_FACTOR * median_size or ratio > OUTLIER_FACTOR:
            print(
                f"warning: {c.image}: {_shape_text(c)}, {ratio:.1f}x the dataset's median spacing "
                f"{mm_text(median_sp)} mm, {n / median_size:.1f}x its median resampled size: check its header",
                file=sys.stderr,
            )


def _check_foreground(ds: Dataset, cases: Sequence[ValidatedCase], label_map: Mapping[int, int]) -> None:
    """Refuse a task none of whose label volumes holds any of its labels: there is nothing to learn."""
    if not any(set(c.label_values) & set(label_map) for c in cases):
        raise InputError(
            ds.root,
            f"every label volume is empty for this task's labels {sorted(label_map)} "
            f"({len(cases)} cases): nothing to segment",
        )


def _save_and_hash(array: np.ndarray, path: Path) -> str:
    """Write ``array`` to ``path`` (:func:`save_npy`) and return the SHA-256 of the file written."""
    save_npy(array, path)
    return sha256_file(path)


def _preprocess_one(
    case: ValidatedCase,
    writer: _BackgroundWriter,
    out: Path,
    split: Mapping[str, str],
    target: Sequence[float],
    norm: str,
    ct_stats: Mapping[str, float] | None,
    label_map: Mapping[int, int] | None,
    num_classes: int | None,
) -> dict[str, Any]:
    """Preprocess one validated case, hand its arrays to ``writer`` (into the folder ``out``) and return
    its manifest row."""
    image, raw = _load_image(case)
    label = _load_label(case) if case.label is not None else None  # None: an unlabelled reading
    # the statistics first, so that their float64 copy of the foreground is gone before the volume work
    stats = foreground_stats(raw, label > 0 if label is not None else None)
    array, seg, geometry = preprocess_case(image, label, target, norm, ct_stats, label_map)
    del image, raw, label
    if not np.isfinite(array).all():  # validation rules this out; never hand Inf/NaN to training
        raise InputError(
            case.image,
            f"preprocessing produced {int(np.count_nonzero(~np.isfinite(array)))} "
            f"non-finite voxels ({norm} normalisation)",
        )
    array_hash = writer.write(array, out / f"{case.case_id}.npy")
    counts, seg_hash = None, None
    if seg is not None:
        seg_hash = writer.write(seg, out / f"{case.case_id}_seg.npy")
        assert num_classes is not None
        counts = class_counts(seg, num_classes)
    return {
        "case": case.case_id,
        "split": split[case.case_id],
        "image_path": str(case.image),
        "label_path": str(case.label) if case.label is not None else None,
        "image_sha256": case.image_sha256,
        "label_sha256": case.label_sha256,
        # futures until the writer is done: run() puts the digests in their place
        "array_sha256": array_hash,
        "seg_sha256": seg_hash,
        **{
            key: geometry[key]
            for key in (
                "orig_shape",
                "orig_spacing",
                "orig_affine",
                "orig_axcodes",
                "crop_box",
                "cropped_shape",
                "shape",
                "spacing",
            )
        },
        "intensity_mean": stats["mean"],
        "intensity_std": stats["std"],
        "intensity_p005": stats["p005"],
        "intensity_p995": stats["p995"],
        "label_counts": counts,
        "num_classes": num_classes,
    }


# ------------------------------------------------------------------------------------------------ run


def held_out_cases(case_ids: Sequence[str], seed: int, fraction: float) -> set[str]:
    """The ``floor(fraction * n + 0.5)`` case ids with the smallest SHA-256 of (seed, "holdout", id).

    Depends only on the ids, the seed and the fraction, so a task and the pool built from the same
    dataset agree on which cases are held back.
    """
    import hashlib

    count = math.floor(fraction * len(case_ids) + 0.5)
    ranked = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}\0holdout\0{c}".encode()).hexdigest())
    return set(ranked[:count])


def run(dataset: Path, out: Path, settings: Mapping[str, Any]) -> None:
    """Validate ``dataset`` and write the preprocessed cases and ``manifest.parquet`` under ``out``.

    Args:
        dataset: the MSD dataset folder.
        out: the output folder (``cases/`` and ``manifest.parquet``).
        settings: see the module docstring.
    """
    dataset, out = Path(dataset), Path(out)
    cfg = resolve_settings(settings)
    labelled = cfg["labelled"]
    seed = cfg["seed"]

    ds = read_dataset(dataset, labelled=labelled)
    cases = validate_dataset(ds, labelled=labelled, keep_bytes=_KEEP_VOXELS_BYTES)
    norm = cfg["normalisation"]
    if norm == "auto":
        norm = normalisation_for_modality(ds.modality)
    spacings = [canonical_spacing(c.affine) for c in cases]
    target = cfg["target_spacing"] or median_spacing(spacings)
    _check_sizes(ds, cases, spacings, target, cfg["max_voxels"])
    if cfg["holdout"] is not None:
        held = held_out_cases([c.case_id for c in cases], seed, cfg["holdout"]["fraction"])
        keep_held = cfg["holdout"]["keep"] == "held"
        cases = [c for c in cases if (c.case_id in held) == keep_held]
        if not cases:
            raise InputError(dataset, f"holdout {cfg['holdout']} leaves no case")

    if labelled:
        labels = dataset_labels(ds, cases)
        label_map: dict[int, int] | None = _label_map(ds, labels, cfg["labels"])
        num_classes: int | None = len(label_map) + 1
        _check_foreground(ds, cases, label_map)
        split = split_cases([c.case_id for c in cases], seed, cfg["split"]["val"], cfg["split"]["test"])
    else:
        labels, label_map, num_classes = {}, None, None
        split = {c.case_id: "pool" for c in cases}

    ct_stats = cfg["ct_stats"]
    if norm == "ct" and ct_stats is None:
        if not labelled:
            raise InputError(
                "settings.ct_stats", "CT normalisation of an unlabelled set needs ct_stats (mean, std, p005, p995)"
            )
        ct_stats = _dataset_ct_stats([c for c in cases if split[c.case_id] == "train"], seed)

    def write_cases(folder: Path) -> list[dict[str, Any]]:
        rows = []
        with _BackgroundWriter() as writer:
            for case in tqdm(cases, desc=f"preprocess {ds.name}", mininterval=2):
                try:
                    rows.append(
                        _preprocess_one(case, writer, folder, split, target, norm, ct_stats, label_map, num_classes)
                    )
                except MemoryError as err:
                    raise InputError(
                        case.image,
                        f"ran out of memory resampling it to {mm_text(target)} mm ({_shape_text(case)}): {err}",
                    ) from None
        for row in rows:  # every write has finished: the futures hold the files' digests
            for key in ("array_sha256", "seg_sha256"):
                if row[key] is not None:
                    row[key] = row[key].result()
        return rows

    # the cases are written into a sibling folder swapped in at the end, so a refused or killed
    # run (also one started by hand) leaves no partial output
    out.mkdir(parents=True, exist_ok=True)
    rows = build_folder(out / "cases", write_cases)

    inputs: dict[str, str] = {}
    inputs: dict[str, str] = {}
    if (dataset / "dataset.json").is_file():
        inputs[str(dataset / "dataset.json")] = sha256_file(dataset / "dataset.json")
    for case in cases:
        inputs[str(case.image)] = case.image_sha256
        if case.label is not None and case.label_sha256 is not None:
            inputs[str(case.label)] = case.label_sha256
    provenance = make_provenance(
        "preprocess",
        dict(settings),
        inputs=inputs,
        seed=seed,
        dataset=ds.name,
        labels={str(k): v for k, v in labels.items()},
        label_map={str(k): v for k, v in (label_map or {}).items()},
        num_classes=num_classes,
        normalisation=norm,
        target_spacing=[float(v) for v in target],
        ct_stats=dict(ct_stats) if ct_stats is not None else None,
    )
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    write_parquet(table, out / "manifest.parquet", provenance)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and call :func:`run`."""
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="MSD dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (cases/, manifest.parquet)")
    add_settings_argument(parser)  # the fields: the module docstring, checked by resolve_settings
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.dataset, args.out, args.settings)


if __name__ == "__main__":
    run_cli(main)
