"""Run one pipeline command inside a Docker image, with the working folder mounted at the same path.

A rule's shell can be prefixed so its step runs in the image instead of the host environment::

    python -m stages.core.container --image segadapt:cpu -- python -m stages.features --model ...

The working folder (default: the current one) is bind-mounted at its own absolute path and is the
container's working directory, so the relative paths Snakemake passes, and the provenance records
that hold them, are the same as in a native run. The command runs with no network unless asked, with
GPUs only when asked, with every Linux capability dropped and ``no-new-privileges``; its stdout and
stderr are streamed to ours and its exit code is returned (a stage's refusal stays exit code 2).
SIGINT/SIGTERM received while it runs are passed on to the container. Uses the Docker SDK for
Python (``docker``); ``DOCKER_HOST`` selects the daemon. Nothing is ever pulled: a missing image is
an error that says how to build it.

The job's environment: the thread counts Snakemake sets per job (:data:`THREAD_ENV`:
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` ...) are passed into the container, so a step uses the
threads its rule was given, as natively (and the same-thread-count bit-identity holds across
engines). ``TMPDIR`` is *mapped*: the launcher makes a private scratch folder inside the host's
``TMPDIR`` (Snakemake's ``tmpdir`` resource, else ``/tmp``), owned by the uid the step runs as,
mounts it at its own path, points ``TMPDIR``/``TMP``/``TEMP``/``TEMPDIR`` at it and deletes it when
the container has exited.

Who the step runs as: the caller's uid:gid (files it writes belong to the caller), never uid 0. When
the caller is root, the step runs as :data:`FALLBACK_USER` (65534:65534, ``nobody:nogroup``) and
the launcher, being root on the host, hands the job's output locations over to it and back: before
the start it gives that uid the paths named by ``--out``/``--work`` in the command (and any writable
mount), with their parent folders (which Snakemake creates as root); after the exit it gives every
file there back to its previous owner, and new files to the caller. Parent folders are shared by
concurrent jobs, so they are given back by the last launcher to finish in that working folder
(a shared lock while a container runs, an exclusive one to give them back; the original owners are
journalled in ``.segadapt-container/`` in the working folder, so even a killed launcher's are
restored by the next one). An explicit ``--user`` with uid 0 is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from stages.core.errors import InputError, run_cli

__all__ = [
    "FALLBACK_USER",
    "OUTPUT_FLAGS",
    "THREAD_ENV",
    "container_options",
    "job_environment",
    "main",
    "output_locations",
    "parse_gpus",
    "parse_user",
    "resolve_user",
    "run_in_docker",
    "shell_prefix",
]

#: exit codes of `docker run` when the command cannot start (daemon error, not executable, not found)
EXIT_DOCKER_ERROR, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 125, 126, 127


#: per-job thread counts Snakemake sets from a rule's ``threads`` (snakemake/shell.py): passed into the container
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
#: the variables Python's tempfile (and Snakemake's ``tmpdir`` resource) use; all point at the mapped scratch
TMP_ENV = ("TMPDIR", "TEMP", "TMP", "TEMPDIR")
#: uid:gid a step runs as when the caller is root: ``nobody:nogroup`` on Debian, owns nothing on the host
FALLBACK_USER = (65534, 65534)
#: the options by which every stage names what it writes (``--out`` everywhere, ``--work`` for resumable state)
OUTPUT_FLAGS = ("--out", "--work")
#: folder in the working folder with the lock and the journal of handed-over parent folders (root callers only)
STATE_DIR = ".segadapt-container"


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
    tmpdir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``DockerClient.containers.create`` that run ``argv`` in ``image``.

    Args:
        image: image name or id (``segadapt:cpu``); never pulled.
        argv: the command, e.g. ``["python", "-m", "stages.features", "--model", ...]``.
        workdir: host folder mounted read-write at the same absolute path and used as the
            container's working directory.
        user: ``(uid, gid)`` the command runs as; ``None`` takes the caller's, or :data:`FALLBACK_USER`
            when the caller is root (see :func:`resolve_user`).
        gpus: ``True`` for every GPU, a sequence of device ids/UUIDs for those, ``False`` for none;
            passed as a Docker device request (needs the NVIDIA container toolkit on the host).
        env: environment variables set in the container.
        mounts: further host folders (data outside the working folder), mounted read-only at the
            same path; ``PATH:rw`` mounts one writable (an annotation inbox).
        network: Docker network mode; ``"none"`` because no step needs the network.
        tmpdir: a host folder mounted writable at its own path, with ``TMPDIR`` (and ``TMP``, ``TEMP``,
            ``TEMPDIR``) pointing at it in the container.
    """
    if not argv:
        raise InputError("command", "no command to run (put it after `--`)")
    if not image:
        raise InputError("--image", "no image given")
    folder = _absolute(workdir)
    if not Path(folder).is_dir():
        raise InputError(folder, "working folder does not exist")
    uid, gid = resolve_user(user)
    volumes: dict[str, dict[str, str]] = {folder: {"bind": folder, "mode": "rw"}}
    for extra in mounts:
        spec = os.fspath(extra)
        writable = spec.endswith(":rw")
        path = _absolute(spec[: -len(":rw")] if writable else spec)
        if not Path(path).exists():
            raise InputError(path, "folder to mount does not exist")
        volumes.setdefault(path, {"bind": path, "mode": "rw" if writable else "ro"})
    environment = dict(env or {})
    if tmpdir is not None:
        scratch = _absolute(tmpdir)  # made by the launcher just before the container (not checked here)
        volumes[scratch] = {"bind": scratch, "mode": "rw"}
        environment.update({key: scratch for key in TMP_ENV})
    options: dict[str, Any] = {
        "image": image,
        "command": [str(a) for a in argv],
        "user": f"{uid}:{gid}",
        "working_dir": folder,
        "volumes": volumes,
        "environment": environment,
        "network_mode": network,
        # a step needs no privilege: no capability (not even chown or setuid), and none regained by exec
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
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

        request = (
            DeviceRequest(count=-1, capabilities=[["gpu"]])
            if ids is None
            else DeviceRequest(device_ids=ids, capabilities=[["gpu"]])
        )
        options["device_requests"] = [request]
    return options


def resolve_user(user: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(uid, gid)`` a step runs as: ``user``, else the caller's; never uid 0.

    Args:
        user: an explicit ``(uid, gid)``; uid 0 is refused.

    Returns:
        ``user``, or the caller's ids, or :data:`FALLBACK_USER` when the caller is root.
    """
    if user is None:
        return FALLBACK_USER if os.getuid() == 0 else (os.getuid(), os.getgid())
    if not (
        isinstance(user, tuple)
        and len(user) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in user)
    ):
        raise InputError("--user", f"uid and gid must be non-negative integers, got {user!r}")
    if user[0] == 0:
        raise InputError(
            "--user",
            "a step never runs as uid 0 (root); leave --user out to run as the caller, "
            f"or as {FALLBACK_USER[0]}:{FALLBACK_USER[1]} when the caller is root",
        )
    return user


def job_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The per-job variables of :data:`THREAD_ENV` that are set in ``environ`` (default: ours)."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in THREAD_ENV if key in environ}


def output_locations(argv: Sequence[str], workdir: str | os.PathLike[str]) -> list[Path]:
    """Absolute paths the command names after :data:`OUTPUT_FLAGS` (``--out X`` or ``--out=X``), in order.

    Relative paths are taken from ``workdir`` (the container's working directory). Everything after a
    second ``--`` (a stage's own pass-through arguments) is still scanned: no stage has one.
    """
    found: list[Path] = []
    args = [str(a) for a in argv]
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in OUTPUT_FLAGS:
            continue
        if not eq:
            if i + 1 >= len(args):
                continue
            value = args[i + 1]
        if value:
            path = Path(value) if os.path.isabs(value) else Path(workdir) / value
            found.append(Path(_absolute(path)))
    return list(dict.fromkeys(found))


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _entries(path: Path) -> Iterator[Path]:
    """``path`` and, for a folder, everything below it; symbolic links are listed, never followed."""
    if not os.path.lexists(path):
        return
    yield path
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path, followlinks=False):
            for name in dirs + files:
                yield Path(folder) / name


class _Handover:
    """Give a root caller's job outputs to :data:`FALLBACK_USER` for the run, and back afterwards.

    See the module docstring. ``locations`` are the job's own outputs (nobody else writes there while
    it runs); their parent folders may be shared with concurrent jobs, so they are journalled and
    given back only by a launcher that finds itself alone in the working folder.
    """

    def __init__(self, workdir: str, locations: Sequence[Path], roots: Sequence[Path], run_as: tuple[int, int]) -> None:
        self.state = Path(workdir) / STATE_DIR
        self.locations = [p for p in locations if _inside(p, roots)]
        self.roots = list(roots)
        self.run_as = run_as
        self.caller = (os.getuid(), os.getgid())
        self.owners: dict[Path, tuple[int, int]] = {}
        self.lock_fd: int | None = None

    def __enter__(self) -> _Handover:
        self.state.mkdir(mode=0o700, exist_ok=True)
        self.lock_fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_SH)  # waits while a finishing launcher gives parents back
        parents: dict[str, tuple[int, int]] = {}
        for location in self.locations:
            parent = location.parent
            parent.mkdir(parents=True, exist_ok=True)
            info = parent.lstat()
            if _inside(parent, self.roots) and (info.st_uid, info.st_gid) != self.run_as:
                parents[str(parent)] = (info.st_uid, info.st_gid)
        # journalled before anything changes: a launcher killed from here on is cleaned up by the next
        fd, _ = tempfile.mkstemp(prefix="parents-", suffix=".json", dir=self.state)  # unique: pids are reused
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(parents))
        for held in parents:
            os.lchown(held, *self.run_as)
        for location in self.locations:
            for entry in _entries(location):
                info = entry.lstat()
                self.owners[entry] = (info.st_uid, info.st_gid)
                os.lchown(entry, *self.run_as)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.lock_fd is not None
        try:
            for location in self.locations:  # the job's own: given back at once
                for entry in _entries(location):
                    self._give_back(entry, self.owners.get(entry))
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another job is running: the last one gives the parent folders back
            else:
                self._restore_parents()
            os.close(self.lock_fd)

    def _give_back(self, entry: Path, previous: tuple[int, int] | None) -> None:
        info = entry.lstat()
        if previous is not None:
            os.lchown(entry, *previous)
        elif info.st_uid == self.run_as[0]:
            os.lchown(entry, *self.caller)

    def _restore_parents(self) -> None:
        """Alone in the working folder: give back every journalled parent folder, and what the steps left in it."""
        for journal in sorted(self.state.glob("parents-*.json")):
            try:
                parents = json.loads(journal.read_text())
            except ValueError:
                parents = {}  # cut short before it was written: nothing was changed yet
            for name, (uid, gid) in parents.items():
                parent = Path(name)
                if not parent.is_dir():
                    continue
                for child in parent.iterdir():  # e.g. a temporary file a killed step left
                    if child.lstat().st_uid == self.run_as[0]:
                        os.lchown(child, *self.caller)
                os.lchown(parent, uid, gid)
            journal.unlink()


def _scratch_folder(run_as: tuple[int, int]) -> str:
    """A private folder in the host's temporary folder, writable by the uid the step runs as."""
    scratch = tempfile.mkdtemp(prefix="segadapt-container-")
    if os.getuid() == 0:
        os.chown(scratch, *run_as)
    elif run_as[0] != os.getuid():
        os.chmod(scratch, 0o1777)  # another uid, and we cannot give it away: sticky and open, like /tmp
    return scratch


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
    inherit_env: bool = True,
) -> int:
    """Run ``argv`` in ``image`` (see :func:`container_options`) and return its exit code.

    Args:
        image, argv, workdir, user, gpus, env, mounts, network: as in :func:`container_options`.
        client: a ``docker.DockerClient``; default ``docker.from_env()`` (honours ``DOCKER_HOST``).
        stdout, stderr: binary streams the command's output goes to; default ours.
        inherit_env: pass the job's thread counts (:func:`job_environment`) on; ``env`` wins over them.

    The container gets a private scratch folder as ``TMPDIR`` (removed afterwards); a root caller's
    step runs as :data:`FALLBACK_USER` with its outputs handed over and back (module docstring).

    Returns:
        The command's exit code, or 125/126/127 like ``docker run`` when it could not start.
    """
    import docker
    from docker.errors import DockerException

    run_as = resolve_user(user)
    environment = {**(job_environment() if inherit_env else {}), **(env or {})}
    container_options(image, argv, workdir, run_as, gpus, environment, mounts=mounts, network=network)  # refusals first
    if client is None:
        try:
            client = docker.from_env()
        except DockerException as exc:
            where = os.environ.get("DOCKER_HOST", "the default socket")
            raise InputError("DOCKER_HOST", f"cannot reach a Docker daemon at {where}: {exc}") from exc
    scratch = _scratch_folder(run_as)
    try:
        options = container_options(
            image, argv, workdir, run_as, gpus, environment, mounts=mounts, network=network, tmpdir=scratch
        )
        handover: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if user is None and os.getuid() == 0:
            folder = options["working_dir"]
            writable = [
                Path(path) for path, bind in options["volumes"].items() if bind["mode"] == "rw" and path != scratch
            ]
            roots = [Path(folder)] + [p for p in writable if str(p) != folder]
            handover = _Handover(folder, output_locations(argv, folder) + roots[1:], roots, run_as)
        with handover:
            return _run_container(client, options, image, argv, stdout, stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_container(
    client: Any,
    options: Mapping[str, Any],
    image: str,
    argv: Sequence[str],
    stdout: BinaryIO | None,
    stderr: BinaryIO | None,
) -> int:
    """Create, attach, start and wait for the container; always remove it."""
    from docker.errors import APIError, ImageNotFound

    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
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
        for number, previous in forwarded.items():
            signal.signal(number, previous)
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
    parser.add_argument(
        "--user",
        type=parse_user,
        default=None,
        help="UID:GID to run as, never uid 0 (default: the caller's; 65534:65534 for root, which then "
        "hands the --out/--work paths over and back)",
    )
    parser.add_argument(
        "--gpus",
        nargs="?",
        const="all",
        default=None,
        help="pass GPUs: all (the default with no value), none, or ids like 0,1",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="set a variable in the container (KEY alone passes the host's value)",
    )
    parser.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="PATH",
        help="also mount PATH at the same path, read-only (PATH:rw: writable), e.g. data outside the working folder",
    )
    parser.add_argument("--network", default="none", help="Docker network mode (default: none)")
    if "--" not in args:
        if {"-h", "--help"} & set(args):
            parser.parse_args(args)
        parser.error("put the command after `--`")
    split = args.index("--")
    opts = parser.parse_args(args[:split])
    code = run_in_docker(
        opts.image,
        args[split + 1 :],
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
