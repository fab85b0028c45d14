"""Run one pipeline command inside a Docker image, with the working folder mounted at the same path.

A rule's shell can be prefixed so its step runs in the image instead of the host environment::

    python -m stages.core.container --image segadapt:cpu -- python -m stages.features --model ...

The working folder (default: the current one) is bind-mounted at its own absolute path and is the
container's working directory, so the relative paths Snakemake passes, and the provenance records
that hold them, are the same as in a native run. The command runs as the caller's uid:gid (files it
writes belong to the caller), with no network unless asked, with GPUs only when asked; its stdout and
stderr are streamed to ours and its exit code is returned (a stage's refusal stays exit code 2).
SIGINT/SIGTERM received while it runs are passed on to the container. Uses the Docker SDK for
Python (``docker``); ``DOCKER_HOST`` selects the daemon. Nothing is ever pulled: a missing image is
an error that says how to build it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from stages.core.errors import InputError, run_cli

__all__ = ["container_options", "main", "parse_gpus", "parse_user", "run_in_docker", "shell_prefix"]

#: exit codes of `docker run` when the command cannot start (daemon error, not executable, not found)
EXIT_DOCKER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127


def _absolute(path: str | os.PathLike[str]) -> str:
    # abspath, not resolve(): a symlinked working folder keeps the spelling the command line uses
    return os.path.abspath(os.fspath(path))


def container_options(
    image: str,
    argv: Sequence[str],
    workdir: str | os.PathLike[str],
    user: tuple[int, int] | None = None,
    gpus: bool | Sequence[str] = False,
    env: Mapping[str, str] | None = None,
    *,
    mounts: Sequence[str | os.PathLike[str]] = (),
    network: str = "none",
) -> dict[str, Any]:
    """Keyword arguments for ``DockerClient.containers.create`` that run ``argv`` in ``image``.

    Args:
        image: image name or id (``segadapt:cpu``); never pulled.
        argv: the command, e.g. ``["python", "-m", "stages.features", "--model", ...]``.
        workdir: host folder mounted read-write at the same absolute path and used as the
            container's working directory.
        user: ``(uid, gid)`` the command runs as; ``None`` takes the caller's.
        gpus: ``True`` for every GPU, a sequence of device ids/UUIDs for those, ``False`` for none;
            passed as a Docker device request (needs the NVIDIA container toolkit on the host).
        env: environment variables set in the container.
        mounts: further host folders (data outside the working folder), mounted read-only at the
            same path; ``PATH:rw`` mounts one writable (an annotation inbox).
        network: Docker network mode; ``"none"`` because no step needs the network.
    """
    if not argv:
        raise InputError("command", "no command to run (put it after `--`)")
    if not image:
        raise InputError("--image", "no image given")
    folder = _absolute(workdir)
    if not Path(folder).is_dir():
        raise InputError(folder, "working folder does not exist")
    uid, gid = (os.getuid(), os.getgid()) if user is None else user
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in (uid, gid)):
        raise InputError("--user", f"uid and gid must be non-negative integers, got {user!r}")
    volumes: dict[str, dict[str, str]] = {folder: {"bind": folder, "mode": "rw"}}
    for extra in mounts:
        spec = os.fspath(extra)
        writable = spec.endswith(":rw")
        path = _absolute(spec[: -len(":rw")] if writable else spec)
        if not Path(path).exists():
            raise InputError(path, "folder to mount does not exist")
        volumes.setdefault(path, {"bind": path, "mode": "rw" if writable else "ro"})
    options: dict[str, Any] = {
        "image": image,
        "command": [str(a) for a in argv],
        "user": f"{uid}:{gid}",
        "working_dir": folder,
        "volumes": volumes,
        "environment": dict(env or {}),
        "network_mode": network,
        # an init process forwards our signals to the command and reaps its children
        "init": True,
        "tty": False,
        "stdin_open": False,
    }
    if gpus is not False:
        ids = None if gpus is True else [str(g) for g in gpus]
        if ids is not None and not ids:
            raise InputError("--gpus", "an empty list of GPU ids")
        from docker.types import DeviceRequest

        request = (DeviceRequest(count=-1, capabilities=[["gpu"]]) if ids is None
                   else DeviceRequest(device_ids=ids, capabilities=[["gpu"]]))
        options["device_requests"] = [request]
    return options


def _stream(chunks: Iterator[tuple[bytes | None, bytes | None]], out: BinaryIO, err: BinaryIO) -> None:
    for stdout_chunk, stderr_chunk in chunks:
        # flushed at once: the rule's log file must show progress while the step runs
        if stdout_chunk:
            out.write(stdout_chunk)
            out.flush()
        if stderr_chunk:
            err.write(stderr_chunk)
            err.flush()


def _start_failure_code(explanation: str) -> int:
    text = explanation.lower()
    if "not found" in text or "no such file" in text:
        return EXIT_NOT_FOUND
    if "permission denied" in text:
        return EXIT_NOT_EXECUTABLE
    return EXIT_DOCKER_ERROR


def run_in_docker(
    image: str,
    argv: Sequence[str],
    workdir: str | os.PathLike[str],
    user: tuple[int, int] | None = None,
    gpus: bool | Sequence[str] = False,
    env: Mapping[str, str] | None = None,
    *,
    mounts: Sequence[str | os.PathLike[str]] = (),
    network: str = "none",
    client: Any = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run ``argv`` in ``image`` (see :func:`container_options`) and return its exit code.

    Args:
        image, argv, workdir, user, gpus, env, mounts, network: as in :func:`container_options`.
        client: a ``docker.DockerClient``; default ``docker.from_env()`` (honours ``DOCKER_HOST``).
        stdout, stderr: binary streams the command's output goes to; default ours.

    Returns:
        The command's exit code, or 125/126/127 like ``docker run`` when it could not start.
    """
    import docker
    from docker.errors import APIError, DockerException, ImageNotFound

    options = container_options(image, argv, workdir, user, gpus, env, mounts=mounts, network=network)
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    if client is None:
        try:
            client = docker.from_env()
        except DockerException as exc:
            where = os.environ.get("DOCKER_HOST", "the default socket")
            raise InputError("DOCKER_HOST", f"cannot reach a Docker daemon at {where}: {exc}") from exc
    try:
        container = client.containers.create(**options)
    except ImageNotFound as exc:
        raise InputError(
            image, "no such image on the Docker daemon (nothing is pulled): build it with containers/build.sh"
        ) from exc
    forwarded: dict[int, Any] = {}

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            container.kill(signal=signum)
        except APIError:
            pass  # it has already stopped

    try:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                forwarded[signum] = signal.signal(signum, forward)
        # attached before the start, as `docker run` does: a command that ends at once loses no output
        chunks = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
        try:
            container.start()
        except APIError as exc:
            message = str(exc.explanation or exc)
            err.write(f"segadapt: error: {image}: cannot start {list(argv)!r}: {message}\n".encode())
            err.flush()
            return _start_failure_code(message)
        _stream(chunks, out, err)
        return int(container.wait()["StatusCode"])
    finally:
        for signum, previous in forwarded.items():
            signal.signal(signum, previous)
        try:
            container.remove(force=True)
        except APIError:
            pass  # already gone: nothing to clean


def shell_prefix(image: str, mounts: Sequence[str] = (), gpus: bool = False) -> str:
    """The shell text that, put before a command, runs it through this launcher in ``image``.

    The workflow gives it to ``shell.prefix`` when ``container.engine`` is ``docker``, so every
    rule's ``python -m stages.<step> ...`` runs in the image while the rules themselves (and the
    shell text Snakemake tracks for code changes) stay the same as in a native run.

    Args:
        image: the image to run.
        mounts: folders outside the working folder to mount (``PATH`` read-only, ``PATH:rw``).
        gpus: pass the GPUs of the job: those in ``CUDA_VISIBLE_DEVICES`` (as Slurm sets it), else all.
    """
    if not image:
        raise InputError("container.image", "no image given")
    args = ["python", "-m", "stages.core.container", "--image", image]
    for mount in dict.fromkeys(mounts):  # once each, in order
        args += ["--mount", mount]
    line = " ".join(shlex.quote(a) for a in args)
    if gpus:
        line += ' --gpus "${CUDA_VISIBLE_DEVICES:-all}"'
    return f"set -euo pipefail; {line} -- "


def parse_user(text: str) -> tuple[int, int]:
    """``"UID:GID"`` (or ``"UID"``, group = uid) as a pair of ints."""
    parts = text.split(":")
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        ids = ()
    if len(ids) not in (1, 2) or min(ids, default=-1) < 0:
        raise InputError("--user", f"expected UID:GID (numbers), got {text!r}")
    return (ids[0], ids[-1])


def parse_gpus(text: str | None) -> bool | list[str]:
    """``None``/``"none"`` → no GPU, ``"all"`` → every GPU, ``"0,1"`` → those devices."""
    if text is None or text == "none":
        return False
    if text == "all":
        return True
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if not ids:
        raise InputError("--gpus", f"expected all, none or a comma-separated list of ids, got {text!r}")
    return ids


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise InputError("--env", f"expected KEY=VALUE or KEY, got {item!r}")
        if not sep:
            # KEY alone passes the host's value on, like `docker run -e KEY`
            if key not in os.environ:
                continue
            value = os.environ[key]
        env[key] = value
    return env


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``[options] -- COMMAND...`` and exit with the command's exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m stages.core.container",
        description="Run COMMAND in a Docker image with the working folder mounted at the same path.",
        usage="%(prog)s --image IMAGE [options] -- COMMAND [ARG...]",
    )
    parser.add_argument("--image", required=True, help="image to run (never pulled)")
    parser.add_argument("--workdir", default=os.getcwd(), help="folder mounted at the same path (default: .)")
    parser.add_argument("--user", type=parse_user, default=None, help="UID:GID to run as (default: the caller's)")
    parser.add_argument("--gpus", nargs="?", const="all", default=None,
                        help="pass GPUs: all (the default with no value), none, or ids like 0,1")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="set a variable in the container (KEY alone passes the host's value)")
    parser.add_argument("--mount", action="append", default=[], metavar="PATH",
                        help="also mount PATH at the same path, read-only (PATH:rw: writable), e.g. data outside the working folder")
    parser.add_argument("--network", default="none", help="Docker network mode (default: none)")
    if "--" not in args:
        if {"-h", "--help"} & set(args):
            parser.parse_args(args)
        parser.error("put the command after `--`")
    split = args.index("--")
    opts = parser.parse_args(args[:split])
    code = run_in_docker(
        opts.image,
        args[split + 1:],
        opts.workdir,
        user=opts.user,
        gpus=parse_gpus(opts.gpus),
        env=_parse_env(opts.env),
        mounts=opts.mount,
        network=opts.network,
    )
    raise SystemExit(code)


if __name__ == "__main__":
    run_cli(main)
