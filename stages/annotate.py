"""Reveal the labels of one query round's picked cases (an oracle reading labelsTr, or an annotator's inbox) into a labelled folder that holds nothing else.

ASSFT (``methods.md`` §2) may only learn from the labels it asked for. This step is the one place
where target labels enter the active-learning loop, and it writes them into a *labelled folder* that
is a complete preprocessed task folder of its own:

- ``{out}/cases/{case}.npy`` — the image (a relative symlink to the task's preprocessed image, or a
  copy), for every labelled case only;
- ``{out}/cases/{case}_seg.npy`` — the revealed label on the preprocessed grid (uint8), for every
  labelled case only;
- ``{out}/manifest.parquet`` — the task manifest's rows of the labelled cases (split ``train``), with
  ``label_path`` / ``label_sha256`` naming the file the label came from and ``label_counts`` of it;
- ``{out}/labelled.parquet`` — the cumulative labelled set: case, round, mode, source, source_sha256,
  seg_sha256.

Training reads ``--data {out}`` and so can only see revealed labels: the folder holds no other
``_seg.npy`` and no manifest row of any other case (``stages.train`` samples the manifest's ``train``
split from ``{data}/cases``). The folder is built in a temporary sibling and swapped in whole, so a
label revealed by an earlier run of a different query cannot linger.

Labels of earlier rounds are copied from the previous round's labelled folder (``--previous``), never
re-read. New labels, from either mode, go through the same checks as any input (whole numbers in the
declared label set, the image's shape and affine) and the same mapping onto the task grid as
preprocessing (:func:`stages.core.geometry.preprocess_label`).

Modes:

- ``oracle`` (benchmarks, the demo): reads ``labelsTr`` (the manifest's ``label_path``) of the picked
  cases only, and checks each file still has the SHA-256 recorded at preprocessing.
- ``inbox`` (real use): writes the query list (``round_{r}_request.csv`` / ``.parquet``) and
  ``round_{r}_INSTRUCTIONS.txt`` into the inbox folder, then looks for ``{inbox}/{case}.nii.gz``. If any
  is missing it stops with exit code 2 and a message naming exactly the missing files, writing no
  output; rerun once the annotator has delivered them.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core.active import IMAGE_LINK_MODES, build_folder, link_file
from stages.core.errors import InputError, run_cli
from stages.core.geometry import preprocess_label
from stages.core.io import atomic_path, make_provenance, read_provenance, save_npy, sha256_file, write_parquet
from stages.core.log import stage_log
from stages.core.msd import read_label_array
from stages.core.settings import add_settings_argument, from_mapping, setting

__all__ = ["AnnotateSettings", "LABELLED_SCHEMA", "MODES", "inbox_files", "run", "main"]

MODES = ("oracle", "inbox")


@dataclass(frozen=True, kw_only=True)
class AnnotateSettings:
    """The settings of an annotation job."""

    mode: str = setting(
        help="oracle (labelsTr) or inbox (annotated files delivered by a person)", schema="assft.annotation"
    )
    image_link: str = setting("symlink", help="how images enter the labelled folder: symlink (relative) or copy")
    affine_atol: float = setting(
        1e-3, help="largest allowed difference between a label's and its image's affine entries (mm)"
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError("settings.mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        if self.image_link not in IMAGE_LINK_MODES:
            raise InputError("settings.image_link", f"must be one of {list(IMAGE_LINK_MODES)}, got {self.image_link!r}")
        if self.affine_atol < 0:
            raise InputError("settings.affine_atol", f"must be a number >= 0, got {self.affine_atol!r}")


LABELLED_SCHEMA = pa.schema(
    [
        ("case", pa.string()),
        ("round", pa.int64()),
        ("mode", pa.string()),
        ("source", pa.string()),
        ("source_sha256", pa.string()),
        ("seg_sha256", pa.string()),
    ]
)

#: Manifest provenance keys carried into the labelled folder's manifest (what the task's data means).
_CARRIED = ("dataset", "labels", "label_map", "num_classes", "normalisation", "target_spacing", "ct_stats")


def inbox_files(inbox: Path, round_index: int) -> dict[str, Path]:
    """Where the inbox request of a round goes: ``csv``, ``parquet`` and ``instructions``."""
    inbox = Path(inbox)
    return {
        "csv": inbox / f"round_{round_index}_request.csv",
        "parquet": inbox / f"round_{round_index}_request.parquet",
        "instructions": inbox / f"round_{round_index}_INSTRUCTIONS.txt",
    }


def _write_request(
    inbox: Path,
    round_index: int,
    request: pd.DataFrame,
    labels: Mapping[str, str],
    task_prov: Mapping[str, Any],
    prov: Mapping[str, Any],
) -> dict[str, Path]:
    files = inbox_files(inbox, round_index)
    buffer = io.StringIO()
    request.to_csv(buffer, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    with atomic_path(files["csv"]) as tmp:
        tmp.write_text(buffer.getvalue())
    write_parquet(request, files["parquet"], prov)
    values = "\n".join(f"  {value}: {name}" for value, name in sorted(labels.items(), key=lambda kv: int(kv[0])))
    text = (
        f"segadapt annotation request, round {round_index}, dataset {task_prov.get('dataset', '?')}\n\n"
        f"Please segment the {len(request)} image(s) listed in {files['csv'].name} (same list in "
        f"{files['parquet'].name}), column image_path.\n\n"
        "For each case, save the label as a NIfTI file named exactly as in the column expected_file:\n"
        f"  {inbox}/<case>.nii.gz\n"
        "on the same voxel grid as its image (same shape and affine: draw on the image itself), with one\n"
        "whole-number value per voxel from this label set:\n"
        f"{values}\n\n"
        "When every file is in place, run the pipeline again; it checks the files and continues.\n"
        "Files are checked for: readable NIfTI, the image's shape and affine, values in the label set.\n"
    )
    with atomic_path(files["instructions"]) as tmp:
        tmp.write_text(text)
    return files


def _load_label(
    path: Path,
    row: Mapping[str, Any],
    allowed: list[int],
    label_map: Mapping[str, int],
    num_classes: int,
    atol: float,
    problems: list[str],
) -> np.ndarray | None:
    """A label file checked like any input and mapped onto the task's preprocessed grid, or None (problems noted).

    The shape is checked from the header first: a file of the wrong size is refused without
    decompressing it (a 0.5 MB upload can decode to gigabytes).
    """
    shape = tuple(int(s) for s in row["orig_shape"])
    try:
        header_shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception:  # unreadable: read_label_array below says how, naming the file
        header_shape = shape
    while len(header_shape) > 3 and header_shape[-1] == 1:  # a trailing singleton axis is allowed
        header_shape = header_shape[:-1]
    if header_shape != shape:
        problems.append(
            f"{path}: label shape {header_shape} (from its header) differs from the image's {shape} "
            f"({row['image_path']})"
        )
        return None
    try:
        data = read_label_array(path, allowed)
        affine = np.asarray(nib.load(path).affine, dtype=np.float64)
    except InputError as err:
        problems.append(str(err))
        return None
    if tuple(data.shape) != shape:
        problems.append(
            f"{path}: label shape {tuple(data.shape)} differs from the image's {shape} ({row['image_path']})"
        )
        return None
    expected = np.asarray(row["orig_affine"], dtype=np.float64).reshape(4, 4)
    if not np.allclose(affine, expected, rtol=0, atol=atol):
        diff = float(np.max(np.abs(affine - expected)))
        problems.append(
            f"{path}: label affine differs from the image's ({row['image_path']}) by up to {diff:.4g} mm "
            f"(tolerance {atol:g})"
        )
        return None
    seg = preprocess_label(data, row, label_map)
    if seg.size and int(seg.max()) >= num_classes:
        problems.append(f"{path}: maps to class {int(seg.max())}, the task has {num_classes} classes")
        return None
    return seg


@dataclass
class _Task:
    """The task's preprocessed folder as the annotation needs it (its labels are never read)."""

    manifest_path: Path
    manifest: pa.Table
    rows: dict[str, dict[str, Any]]
    prov: dict[str, Any]
    labels: dict[str, str]
    label_map: dict[str, int]
    num_classes: int

    @property
    def allowed(self) -> list[int]:
        return sorted(int(v) for v in self.labels)


def _read_query(query: Path) -> tuple[int, list[str]]:
    """The round of ``query.parquet`` and its picked cases in pick order."""
    if not query.is_file():
        raise InputError(query, "missing query table (run stages.query_round first)")
    q = pd.read_parquet(query)
    if not {"case", "picked", "pick_order", "round"} <= set(q.columns):
        raise InputError(query, "lacks columns case, picked, pick_order, round (not a query table?)")
    rounds = q["round"].unique()
    if len(rounds) != 1:
        raise InputError(query, f"holds several rounds {sorted(rounds.tolist())}")
    return int(rounds[0]), q[q["picked"]].sort_values("pick_order")["case"].astype(str).tolist()


def _read_task(data: Path, query: Path, picked: list[str]) -> _Task:
    manifest_path = data / "manifest.parquet"
    if not manifest_path.is_file():
        raise InputError(manifest_path, "missing: preprocess the task first")
    manifest = pq.read_table(manifest_path)
    rows = {str(r["case"]): r for r in manifest.to_pylist()}
    prov = read_provenance(manifest_path)
    labels = prov.get("labels") or {}
    label_map = prov.get("label_map") or {}
    num_classes = prov.get("num_classes")
    if not labels or not label_map or not num_classes:
        raise InputError(manifest_path, "declares no labels (was the task preprocessed as a labelled set?)")
    outside = [c for c in picked if c not in rows or rows[c]["split"] != "train"]
    if outside:
        raise InputError(query, f"picked cases not in the task's train split: {outside[:10]}")
    return _Task(manifest_path, manifest, rows, prov, labels, label_map, int(num_classes))


def _read_earlier(previous: Path | None, task: _Task, round_index: int) -> list[dict[str, Any]]:
    """The labelled records of earlier rounds, each label checked against its recorded SHA-256."""
    if previous is None:
        return []
    if not previous.is_file():
        raise InputError(previous, "missing labelled table of the previous round")
    earlier = pd.read_parquet(previous).to_dict("records")
    for rec in earlier:
        seg_path = previous.parent / "cases" / f"{rec['case']}_seg.npy"
        if not seg_path.is_file():
            raise InputError(seg_path, "missing: the previous labelled folder is incomplete")
        if sha256_file(seg_path) != rec["seg_sha256"]:
            raise InputError(seg_path, "differs from the SHA-256 recorded in labelled.parquet")
        if int(rec["round"]) >= round_index:
            raise InputError(previous, f"holds labels of round {rec['round']}, not before round {round_index}")
        if rec["case"] not in task.rows:
            raise InputError(previous, f"case {rec['case']!r} is not in {task.manifest_path}")
    return earlier


Revealed = dict[str, tuple[np.ndarray, str, str]]
"""case -> (label on the task grid, source file, source SHA-256)."""


def _reveal_oracle(picked: list[str], task: _Task, atol: float, problems: list[str]) -> Revealed:
    """labelsTr of the picked cases, each checked against the SHA-256 recorded at preprocessing."""
    new: Revealed = {}
    for case in picked:
        row = task.rows[case]
        if not row["label_path"]:
            problems.append(
                f"{task.manifest_path}: case {case} has no label_path (the oracle needs labelsTr; use inbox mode)"
            )
            continue
        path = Path(row["label_path"])
        if not path.is_file():
            problems.append(f"{path}: label file not found")
            continue
        digest = sha256_file(path)
        if row["label_sha256"] and digest != row["label_sha256"]:
            problems.append(f"{path}: changed since preprocessing (SHA-256 differs from the manifest's)")
            continue
        seg = _load_label(path, row, task.allowed, task.label_map, task.num_classes, atol, problems)
        if seg is not None:
            new[case] = (seg, str(path), digest)
    return new


def _reveal_inbox(
    inbox: Path,
    picked: list[str],
    task: _Task,
    round_index: int,
    request_prov: Mapping[str, Any],
    atol: float,
    problems: list[str],
) -> Revealed:
    """Write the round's request into ``inbox``, then read the delivered files (stop if any is missing)."""
    expected = {case: inbox / f"{case}.nii.gz" for case in picked}
    request = pd.DataFrame(
        {
            "case": picked,
            "pick_order": list(range(len(picked))),
            "image_path": [task.rows[c]["image_path"] for c in picked],
            "expected_file": [str(expected[c]) for c in picked],
        }
    )
    files = _write_request(inbox, round_index, request, task.labels, task.prov, request_prov)
    missing = [str(p) for p in expected.values() if not p.is_file()]
    if missing:
        raise InputError(
            inbox,
            f"waiting for {len(missing)} of {len(picked)} annotation(s) of round {round_index}; missing: "
            + ", ".join(missing)
            + f". Instructions: {files['instructions']}. Rerun when they are in place.",
        )
    new: Revealed = {}
    for case, path in expected.items():
        seg = _load_label(path, task.rows[case], task.allowed, task.label_map, task.num_classes, atol, problems)
        if seg is not None:
            new[case] = (seg, str(path), sha256_file(path))
    return new


def _write_labelled(
    folder: Path,
    task: _Task,
    earlier: list[dict[str, Any]],
    previous_dir: Path | None,
    picked: list[str],
    new: Revealed,
    images: Mapping[str, Path],
    round_index: int,
    cfg: AnnotateSettings,
    prov: Mapping[str, Any],
) -> None:
    """Fill the labelled folder: images, labels, the manifest of the labelled cases, labelled.parquet."""
    records = []
    for rec in earlier:
        case = rec["case"]
        link_file(images[case], folder / "cases" / f"{case}.npy", cfg.image_link)
        assert previous_dir is not None
        link_file(previous_dir / "cases" / f"{case}_seg.npy", folder / "cases" / f"{case}_seg.npy", "copy")
        records.append({k: rec[k] for k in LABELLED_SCHEMA.names})
    for case in picked:
        seg, source, digest = new[case]
        link_file(images[case], folder / "cases" / f"{case}.npy", cfg.image_link)
        seg_path = folder / "cases" / f"{case}_seg.npy"
        save_npy(seg, seg_path)
        records.append(
            {
                "case": case,
                "round": round_index,
                "mode": cfg.mode,
                "source": source,
                "source_sha256": digest,
                "seg_sha256": sha256_file(seg_path),
            }
        )
    records.sort(key=lambda r: (int(r["round"]), r["case"]))
    manifest_rows = []
    for rec in sorted(records, key=lambda r: r["case"]):
        row = dict(task.rows[rec["case"]])
        seg = np.load(folder / "cases" / f"{rec['case']}_seg.npy")
        row.update(
            split="train",
            label_path=rec["source"],
            label_sha256=rec["source_sha256"],
            **({"seg_sha256": rec["seg_sha256"]} if "seg_sha256" in row else {}),
            label_counts=[int(v) for v in np.bincount(seg.ravel(), minlength=task.num_classes)],
        )
        manifest_rows.append(row)
    write_parquet(
        pa.Table.from_pylist(manifest_rows, schema=task.manifest.schema.remove_metadata()),
        folder / "manifest.parquet",
        prov,
    )
    write_parquet(pa.Table.from_pylist(records, schema=LABELLED_SCHEMA), folder / "labelled.parquet", prov)


def run(
    query: Path,
    data: Path,
    out: Path,
    settings: Mapping[str, Any],
    previous: Path | None = None,
    inbox: Path | None = None,
) -> None:
    """Reveal the picked cases' labels and write the cumulative labelled folder ``out``.

    Args:
        query: this round's ``query.parquet`` (from ``stages.query_round``).
        data: the task's preprocessed folder (images, manifest; its labels are never read).
        out: the labelled folder to (re)create.
        settings: see :class:`AnnotateSettings`.
        previous: the previous round's ``labelled.parquet`` (its folder holds the earlier labels); None
            at round 0.
        inbox: the inbox folder (``inbox`` mode).

    Raises:
        InputError: bad input, or (inbox mode) annotated files still missing; nothing is written then.
    """
    query, data, out = Path(query), Path(data), Path(out)
    cfg = from_mapping(AnnotateSettings, settings, "annotate", "settings", noun="annotate settings")
    if cfg.mode == "inbox" and inbox is None:
        raise InputError("--inbox", "inbox mode needs the inbox folder where annotated files arrive")
    previous = Path(previous) if previous is not None else None

    round_index, picked = _read_query(query)
    task = _read_task(data, query, picked)
    earlier = _read_earlier(previous, task, round_index)
    again = sorted(set(picked) & {rec["case"] for rec in earlier})
    if again:
        raise InputError(query, f"picks cases that are already labelled: {again}")

    problems: list[str] = []
    if cfg.mode == "oracle":
        new = _reveal_oracle(picked, task, cfg.affine_atol, problems)
    else:
        assert inbox is not None
        request_prov = make_provenance(
            "annotate", dict(settings), inputs=[query], task=task.prov.get("dataset"), round=round_index, request=True
        )
        new = _reveal_inbox(Path(inbox), picked, task, round_index, request_prov, cfg.affine_atol, problems)
    images = {rec["case"]: data / "cases" / f"{rec['case']}.npy" for rec in earlier}
    images.update({case: data / "cases" / f"{case}.npy" for case in picked})
    problems += [f"{p}: missing preprocessed image" for p in images.values() if not p.is_file()]
    if problems:
        raise InputError(query, f"{len(problems)} problem(s) with the revealed labels:\n  " + "\n  ".join(problems))

    inputs = [query, task.manifest_path] + ([previous] if previous is not None else [])
    prov = make_provenance(
        "annotate",
        dict(settings),
        inputs=inputs,
        task=task.prov.get("dataset"),
        round=round_index,
        mode=cfg.mode,
        picked=picked,
        labelled=sorted(images),
        **{k: task.prov.get(k) for k in _CARRIED},
    )
    previous_dir = previous.parent if previous is not None else None
    build_folder(
        out,
        lambda folder: _write_labelled(
            folder, task, earlier, previous_dir, picked, new, images, round_index, cfg, prov
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.annotate", description=__doc__.splitlines()[0])
    parser.add_argument("--query", type=Path, required=True, help="this round's query.parquet")
    parser.add_argument("--data", type=Path, required=True, help="the task's preprocessed folder")
    parser.add_argument("--previous", type=Path, default=None, help="previous round's labelled.parquet")
    parser.add_argument("--inbox", type=Path, default=None, help="inbox folder (mode inbox)")
    parser.add_argument("--out", type=Path, required=True, help="labelled folder to write")
    add_settings_argument(parser, AnnotateSettings)
    args = parser.parse_args(argv)
    with stage_log(parser, args):
        run(args.query, args.data, args.out, args.settings, previous=args.previous, inbox=args.inbox)


if __name__ == "__main__":
    run_cli(main)
