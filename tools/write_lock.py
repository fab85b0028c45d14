"""Write (or check) requirements.lock: the exact versions of the project's dependency closure.

The closure of ``pyproject.toml``'s ``[project].dependencies`` and of every optional extra, as
installed in the running environment, one ``name==version`` a line. The README's commands, CI
(``.ci/run``), the conda environment (``envs/segadapt.yaml``) and both container images install with
``-c requirements.lock``, so every place runs the same versions; ``tests/integration/test_dependencies.py``
checks that they agree.

    python tools/write_lock.py           # rewrite requirements.lock from this environment
    python tools/write_lock.py --check   # exit 1 if this environment differs from the lock
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
HEADER = """\
# Exact versions of segadapt's dependencies: the closure of pyproject.toml's dependencies and of
# every extra, as installed in the environment the test suite passed in. Written by
# `python tools/write_lock.py`; installed with `pip install -c requirements.lock ...` by the
# README's commands, .ci/run, envs/segadapt.yaml and containers/ (tests/integration/test_dependencies.py checks
# that they agree). torch's build (+cpu / CUDA) is chosen per machine or image, not locked.
"""


def roots(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """The project's direct requirements: runtime and every extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = [r for reqs in project.get("optional-dependencies", {}).values() for r in reqs]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` of ``requirements`` and everything they require here."""
    pins: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"{req.name} is not installed here: the lock is the closure of the dependencies and every "
                "extra; install them first (pip install -c requirements.lock -e '.[test,docker,slurm]')"
            ) from None
        pins[name] = dist.version.split("+")[0]
        envs = [{"extra": e} for e in sorted(req.extras)] or [{"extra": ""}]
        for spec in dist.requires or []:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return pins


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` from a lock file; every line must be an exact pin."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in version for c in "<>=!~*,; "):
            raise ValueError(f"{path}:{number}: {line!r} is not an exact pin name==version")
        pins[canonicalize_name(name)] = version
    return pins


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    pins = closure(roots())
    pins["pip"] = md.version("pip")  # the images install pip itself from the wheelhouse
    if args.check:
        locked = read_lock()
        diff = sorted(set(pins.items()) ^ set(locked.items()))
        for name, version in diff:
            where = "lock" if locked.get(name) == version else "environment"
            print(f"{LOCK.name}: {name}=={version} only in the {where}", file=sys.stderr)
        return 1 if diff else 0
    LOCK.write_text(render(pins))
    print(f"{LOCK}: {len(pins)} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
