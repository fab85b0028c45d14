"""Hash of the code a stage runs: its module plus every ``stages`` module it imports, transitively.

Snakemake tracks a rule's shell text, not the Python modules it imports, so each rule passes
``code_hash(step)`` in ``params:``; a change to a module reruns exactly the jobs whose stage imports it.
Only the standard library is used here, so the Snakefile can import it cheaply.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

__all__ = ["code_hash", "module_closure"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # .../stages
PACKAGE = PACKAGE_ROOT.name


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_ROOT.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_pkg else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # a submodule import also runs its parent packages' __init__
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | parents if m.split(".")[0] == PACKAGE}


@functools.cache
def module_closure(step: str) -> tuple[str, ...]:
    """Names of the ``stages`` modules that ``stages.<step>`` runs, itself included, sorted."""
    start = step if step.startswith(f"{PACKAGE}.") else f"{PACKAGE}.{step}"
    if _module_file(start) is None:
        raise ValueError(f"no stage module {start!r} under {PACKAGE_ROOT}")
    seen: set[str] = set()
    todo = [start, PACKAGE]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return tuple(sorted(seen))


def code_hash(step: str) -> str:
    """SHA-256 hex digest over the source of every module in :func:`module_closure`."""
    digest = hashlib.sha256()
    for name in module_closure(step):
        path = _module_file(name)
        assert path is not None
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
