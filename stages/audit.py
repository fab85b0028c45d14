"""Print an artifact's lineage from its provenance records and check each recorded input hash against the disk.

Each artifact the pipeline writes carries a provenance record (``stages.core.io.make_provenance``): the
stage that made it, its settings and their hash, the seed, the code version and the SHA-256 of every
input file. The audit walks those records from one artifact through its inputs, their inputs and so on
(each artifact expanded once, to a depth limit), and re-hashes every recorded input. A task manifest
(``manifest.parquet`` with ``array_sha256``/``seg_sha256`` columns) also has its preprocessed arrays,
``cases/{case}.npy`` and ``cases/{case}_seg.npy`` beside it, re-hashed: the training data is checked too,
not only the NIfTI files it was made from. Exit status 0 when
every input is present and unchanged, 1 otherwise (the differing and missing files are listed), 2 when
the artifact itself cannot be audited.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.errors import InputError, run_cli
from stages.core.io import read_provenance, sha256_file

__all__ = [
    "ARRAY_COLUMNS",
    "Finding",
    "AuditReport",
    "audit",
    "format_report",
    "manifest_arrays",
    "run",
    "main",
    "entry",
]


@dataclass(frozen=True)
class Finding:
    """One recorded input that no longer matches.

    Attributes:
        path: the input as recorded (relative to the run's working folder, or absolute).
        problem: ``missing`` or ``differs``.
        recorded: the SHA-256 the provenance holds.
        actual: the SHA-256 of the file now on disk (None when missing).
        needed_by: the artifact whose record lists this input (for an array: the manifest listing it).
        kind: ``input`` (a recorded input) or ``array`` (a preprocessed array a manifest lists).
    """

    path: str
    problem: str
    recorded: str
    actual: str | None
    needed_by: str
    kind: str = "input"


@dataclass
class AuditReport:
    """The lineage as printable lines plus every problem found.

    Attributes:
        lines: the lineage, one line each, indented by depth.
        findings: inputs (and a manifest's preprocessed arrays) that are missing or differ.
        checked: how many distinct input files (and arrays) were hashed.
        truncated: artifacts not expanded because the depth limit was reached.
    """

    lines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    checked: int = 0
    truncated: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every recorded input is present with its recorded hash."""
        return not self.findings


def _short(value: Any, width: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def _safe_provenance(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        record = read_provenance(path)
    except Exception as err:  # a corrupt or foreign file is a finding for the reader, not a crash
        return {}, f"provenance unreadable ({type(err).__name__}: {err})"
    return (record if isinstance(record, dict) else {}), None


#: manifest column -> the file it holds the SHA-256 of, relative to the manifest's folder
ARRAY_COLUMNS = {"array_sha256": "cases/{case}.npy", "seg_sha256": "cases/{case}_seg.npy"}


def manifest_arrays(path: Path) -> list[tuple[str, str]]:
    """``(relative file, recorded SHA-256)`` of every preprocessed array a task manifest lists.

    Empty for any other file (not Parquet, or without a ``case`` column and the hash columns of
    :data:`ARRAY_COLUMNS`); a null hash (an unlabelled case has no ``_seg.npy``) is skipped.
    """
    if path.suffix != ".parquet":
        return []
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception:  # not readable as Parquet: the provenance reader reports it
        return []
    columns = [c for c in ARRAY_COLUMNS if c in names]
    if "case" not in names or not columns:
        return []
    table = pq.read_table(path, columns=["case", *columns]).to_pydict()
    arrays = []
    for i, case in enumerate(table["case"]):
        for column in columns:
            digest = table[column][i]
            if digest is not None:
                arrays.append((ARRAY_COLUMNS[column].format(case=case), str(digest)))
    return arrays


def audit(
    path: Path, root: Path = Path("."), max_depth: int = 12, hasher: Callable[[Path], str] = sha256_file
) -> AuditReport:
    """Walk the lineage of ``path`` and verify every recorded input.

    Args:
        path: the artifact (Parquet, safetensors, JSON with a ``provenance`` key, or any file with a
            ``<name>.prov.json`` sidecar).
        root: the run's working folder; relative input paths in the records are resolved against it.
        max_depth: generations of records shown: 1 = the artifact's record and its inputs' hashes, 2 = also
            the inputs' records and their inputs' hashes, and so on; artifacts whose records were not
            expanded are listed in ``truncated`` (their own inputs are not checked).
        hasher: file -> SHA-256 hex (injectable for tests).
    """
    top = path if path.is_absolute() or path.exists() else root / path
    if not top.is_file():
        raise InputError(path, "file not found")
    record, problem = _safe_provenance(top)
    if problem:
        raise InputError(path, problem)
    if not record:
        raise InputError(
            path,
            "carries no segadapt provenance record (Parquet/safetensors metadata, a JSON "
            "'provenance' key or a .prov.json sidecar)",
        )
    report = AuditReport()
    hashes: dict[Path, str | None] = {}
    expanded: set[Path] = set()

    def resolve(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else root / p

    def digest(p: Path) -> str | None:
        if p not in hashes:
            hashes[p] = hasher(p) if p.is_file() else None
        return hashes[p]

    def describe(record: dict[str, Any], indent: str) -> None:
        report.lines.append(
            f"{indent}stage: {record.get('stage')}  config_hash: {record.get('config_hash')}  "
            f"seed: {record.get('seed')}  code: {record.get('code_version')}"
        )
        extra = {
            k: v
            for k, v in record.items()
            if k not in {"stage", "config_hash", "seed", "code_version", "settings", "inputs"}
        }
        if extra:
            report.lines.append(f"{indent}fields: {_short(extra)}")
        if record.get("settings") is not None:
            report.lines.append(f"{indent}settings: {_short(record['settings'])}")

    def check(
        child_name: str, child: Path, recorded: str, needed_by: str, indent: str, kind: str = "input"
    ) -> str | None:
        actual = digest(child)
        if actual is None:
            status = "MISSING"
            report.findings.append(Finding(child_name, "missing", recorded, None, needed_by, kind))
        elif actual != recorded:
            status = f"DIFFERS (recorded {recorded[:12]}, now {actual[:12]})"
            report.findings.append(Finding(child_name, "differs", recorded, actual, needed_by, kind))
        else:
            status = f"ok {recorded[:12]}"
        report.lines.append(f"{indent}{child_name}  {status}")
        return actual

    def walk(name: str, p: Path, record: dict[str, Any], generation: int) -> None:
        indent = "    " * generation
        expanded.add(p.resolve())
        describe(record, indent + "  ")
        arrays = manifest_arrays(p)
        if arrays:
            report.lines.append(f"{indent}  preprocessed arrays:")
            folder = Path(name).parent
            for relative, recorded in arrays:
                check(str(folder / relative), p.parent / relative, recorded, name, indent + "    ", "array")
        inputs = record.get("inputs") or {}
        if inputs:
            report.lines.append(f"{indent}  inputs:")
        for child_name, recorded in sorted(inputs.items()):
            child = resolve(child_name)
            actual = check(child_name, child, recorded, name, indent + "    ")
            if actual is None:
                continue
            if child.resolve() in expanded:
                sub, _ = _safe_provenance(child)
                if sub:
                    report.lines.append(f"{indent}      (lineage shown above)")
                continue
            sub, problem = _safe_provenance(child)
            if problem:
                report.lines.append(f"{indent}      {problem}")
                continue
            if not sub:
                continue  # a source file: its hash is the end of the chain
            if generation + 1 >= max_depth:
                report.truncated.append(child_name)
                report.lines.append(f"{indent}      (depth limit {max_depth}: lineage not expanded)")
                continue
            walk(child_name, child, sub, generation + 1)

    report.lines.append(str(path))
    walk(str(path), top, record, 0)
    report.checked = len(hashes)
    return report


def format_report(report: AuditReport, quiet: bool = False) -> str:
    """The lineage (unless ``quiet``) and a verdict with every missing or differing input."""
    lines = [] if quiet else list(report.lines) + [""]
    if report.ok:
        lines.append(f"audit: OK, {report.checked} recorded input files match their hashes")
    else:
        lines.append(f"audit: FAILED, {len(report.findings)} of the recorded inputs do not match:")
        seen = set()
        for f in report.findings:
            if (f.path, f.problem) in seen:
                continue
            seen.add((f.path, f.problem))
            detail = "missing" if f.problem == "missing" else f"differs: recorded {f.recorded}, now {f.actual}"
            role = "preprocessed array listed in" if f.kind == "array" else "input of"
            lines.append(f"  {f.path}: {detail} ({role} {f.needed_by})")
    if report.truncated:
        lines.append(
            f"audit: {len(report.truncated)} artifacts not expanded (depth limit); their own inputs were not checked"
        )
    return "\n".join(lines)


def run(path: Path, root: Path = Path("."), max_depth: int = 12, quiet: bool = False) -> int:
    """Audit ``path``, print the lineage and verdict, and return the exit status (0 all match, 1 otherwise).

    Args:
        path: the artifact to audit.
        root: the run's working folder (recorded input paths are relative to it).
        max_depth: generations of inputs expanded.
        quiet: print only the verdict and the problems.
    """
    if max_depth < 1:
        raise InputError("--depth", f"must be at least 1, got {max_depth}")
    report = audit(path, root, max_depth)
    print(format_report(report, quiet))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segadapt-audit", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the artifact (Parquet, safetensors, JSON or a file with a sidecar)")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="the run's working folder; recorded input paths are relative to it (default: .)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=12,
        help="generations of provenance records to follow (1: the artifact and its direct inputs; default 12)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the verdict and the problems")
    args = parser.parse_args(argv)
    status = run(args.path, args.root, args.depth, args.quiet)
    if status:
        sys.exit(status)


def entry() -> None:
    """Console-script entry point (``segadapt-audit``)."""
    run_cli(main)


if __name__ == "__main__":
    entry()
