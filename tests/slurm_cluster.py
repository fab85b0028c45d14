"""Bring a real single-node Slurm cluster (Debian's slurm-wlm and munge) up and down for the tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SLURM_CONF",
    "SlurmCluster",
    "SlurmUnavailable",
    "ensure_slurm_installed",
    "single_node_slurm",
]

# The Snakemake jobstep executor drops SLURM_CONF inside jobs, so `srun` there reads the default path:
# the configuration has to live here, not in a temporary folder.
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_PID = MUNGE_RUN / "munged.pid"
PARTITION = "debug"
PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "mungekey", "munge", "unmunge", "sinfo", "squeue", "sbatch")
# Daemons live in sbin, which a non-login shell may leave out of PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# apt-get output that means "no network / no mirror", the one apt failure that skips instead of failing.
OFFLINE_PATTERNS = re.compile(
    r"Temporary failure resolving|Could not resolve|Failed to fetch|Unable to connect|"
    r"Network is unreachable|Unable to locate package|Connection (timed out|refused)"
)

SLURM_CONF_TEMPLATE = """\
# Written by tests/slurm_cluster.py for a throw-away single-node test cluster; restored afterwards.
ClusterName=ci
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile={state}/run/slurmctld.pid
SlurmdPidFile={state}/run/slurmd.pid
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd.log
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue must still list a finished job when Snakemake asks (the plugin wants >= 3x its poll interval),
# and the tests read finished jobs' states from squeue after the run.
MinJobAge=3600
KillWait=5
# Without a default, a job that asks for no memory takes the whole node and jobs run one at a time.
DefMemPerCPU=1000
MailProg=/bin/true
# One stand-in GPU (gres.conf points it at /dev/null) so that `--gpus=1` jobs get scheduled.
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 {hardware} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine for a reason outside the code under test."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running single-node cluster.

    Args:
        state_dir: folder holding the controller state, spool, pid and log files.
        node: the node's name (the short host name).
        partition: the one partition, the default one.
        cpus: CPUs of the node.
        memory_mb: memory Slurm may hand out on the node (MiB).
    """

    state_dir: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int

    def logs(self, tail: int = 40) -> str:
        """The last lines of the controller and node daemon logs, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.state_dir / "log" / name
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else ["(absent)"]
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; stdout/stderr are captured so a daemon that forks cannot hold our pipes open."""
    exe = _which(cmd[0]) or cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def ensure_slurm_installed(timeout: float = 600) -> None:
    """Install slurm-wlm and munge with apt-get when their programs are missing.

    Args:
        timeout: seconds allowed for each apt-get call.

    Raises:
        SlurmUnavailable: not root, no apt-get, or apt-get cannot reach its mirrors (offline).
        RuntimeError: apt-get failed for another reason.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm test needs root (it writes /etc/slurm/slurm.conf and starts daemons)")
    if all(_which(b) for b in BINARIES):
        return
    if _which("apt-get") is None:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    attempt = ""
    # Try without `update` first: with fresh package lists that needs no index download; `update` is
    # for images that ship without lists or with stale ones.
    for cmds in (
        [["apt-get", "install", "-y", "-q", *PACKAGES]],
        [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]],
    ):
        attempt = ""
        for cmd in cmds:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
            )
            attempt += f"$ {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}\n"
            if proc.returncode != 0:
                break
        else:
            if all(_which(b) for b in BINARIES):
                return
    if OFFLINE_PATTERNS.search(attempt):
        raise SlurmUnavailable(f"apt-get could not install {' '.join(PACKAGES)} (offline?):\n{attempt[-1500:]}")
    missing = [b for b in BINARIES if not _which(b)]
    raise RuntimeError(
        f"apt-get could not install {' '.join(PACKAGES)} (missing: {' '.join(missing)}):\n{attempt[-4000:]}"
    )


def _node_hardware() -> tuple[str, str, int]:
    """The node's name, its CPU layout as slurmd sees it, and the memory to offer (total minus 1 GiB).

    `slurmd -C` reports exactly what slurmd will check at registration, so the node never drains for
    a configuration that disagrees with the hardware.
    """
    out = _run(["slurmd", "-C"]).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    hardware = " ".join(
        f"{k}={fields[k]}"
        for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        if k in fields
    )
    return fields["NodeName"], hardware, max(int(fields["RealMemory"]) - 1024, 1024)


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a container's PID 1 may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _stop_pid(pid: int, wait: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL one daemon by its id."""
    for sig, patience in ((15, wait), (9, 5)):
        if not _pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.1)


def _read_pid(path: Path, timeout: float = 15) -> int:
    """The id in a daemon's pid file, waiting for the forked daemon to write it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no pid file {timeout:.0f} s after starting the daemon")


def _munge_works() -> bool:
    encode = subprocess.run([_which("munge") or "munge", "-n"], capture_output=True, timeout=10)
    if encode.returncode != 0:
        return False
    decode = subprocess.run([_which("unmunge") or "unmunge"], input=encode.stdout, capture_output=True, timeout=10)
    return decode.returncode == 0


def _start_munge() -> int | None:
    """Start munged as the munge user with its default socket; return its pid, or None if one already runs."""
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        if _pid_alive(int(MUNGE_PID.read_text().split()[0])) and _munge_works():
            return None  # someone else's munged: use it, leave it running
    if not MUNGE_KEY.exists():
        _run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"])
    # munged refuses keys, key folders and socket folders that others could read or write.
    shutil.chown(MUNGE_KEY.parent, "munge", "munge")
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.parent.chmod(0o700)
    MUNGE_KEY.chmod(0o400)
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)  # 0700 makes "Socket is inaccessible" for root's clients
    for folder in (Path("/var/log/munge"), Path("/var/lib/munge")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
        folder.chmod(0o700)
    MUNGE_PID.unlink(missing_ok=True)
    _run(["runuser", "-u", "munge", "--", _which("munged") or "munged"])
    pid = _read_pid(MUNGE_PID)
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            _stop_pid(pid)
            raise RuntimeError("munged started but `munge -n | unmunge` keeps failing")
        time.sleep(0.1)
    return pid


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        proc = _run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10)
        state = proc.stdout.strip()
        if state == "idle":
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Slurm node is {state!r}, not idle, {timeout:.0f} s after start\n{cluster.logs()}")


def _running(name: str) -> bool:
    """True if a live process with this command name exists (zombies do not count)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name and _pid_alive(int(comm.parent.name)):
                return True
    return False


@contextlib.contextmanager
def _replaced_files(files: dict[Path, str], backup_dir: Path) -> Iterator[None]:
    """Write system files for the block's duration; put back what was there (or nothing) afterwards."""
    backups: dict[Path, Path | None] = {}
    try:
        for i, (path, text) in enumerate(files.items()):
            backup = backup_dir / f"{i}.{path.name}.orig"
            if path.exists():
                shutil.copy2(path, backup)
                backups[path] = backup
            else:
                backups[path] = None
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        yield
    finally:
        for path, backup in backups.items():
            if backup is None:
                path.unlink(missing_ok=True)
            else:
                shutil.copy2(backup, path)


@contextlib.contextmanager
def single_node_slurm(state_dir: Path, timeout: float = 60) -> Iterator[SlurmCluster]:
    """Run munged, slurmctld and slurmd on this machine for the duration of the `with` block.

    Writes /etc/slurm/slurm.conf and gres.conf (existing ones are backed up and put back), keeps every
    other file under `state_dir`, waits until the node is idle, and on leaving stops the daemons it
    started by their ids (TERM, then KILL; munged last), also when the block raises. The node offers
    one stand-in GPU (a GRES backed by /dev/null), so `--gpus=1` jobs are scheduled as on a GPU node.

    Args:
        state_dir: an empty folder for state, spool, pid and log files.
        timeout: seconds to wait for the node to become idle.

    Raises:
        SlurmUnavailable: not root, packages not installable, or a Slurm already runs on this machine.
        RuntimeError: a daemon did not come up; the message holds the logs.
    """
    ensure_slurm_installed()
    for daemon in ("slurmctld", "slurmd"):
        if _running(daemon):
            raise SlurmUnavailable(f"a {daemon} already runs on this machine; the test brings up its own cluster")
    node, hardware, memory_mb = _node_hardware()
    cpus = int(re.search(r"CPUs=(\d+)", hardware).group(1))
    for sub in ("run", "state", "spool", "log"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(state_dir=state_dir, node=node, partition=PARTITION, cpus=cpus, memory_mb=memory_mb)
    files = {
        SLURM_CONF: SLURM_CONF_TEMPLATE.format(
            node=node, state=state_dir, hardware=hardware, memory_mb=memory_mb, partition=PARTITION
        ),
        SLURM_CONF.with_name("gres.conf"): f"NodeName={node} Name=gpu File=/dev/null\n",
    }
    started: list[int] = []  # stopped in reverse order: slurmd, slurmctld, munged
    with _replaced_files(files, state_dir):
        try:
            munge_pid = _start_munge()
            if munge_pid is not None:
                started.append(munge_pid)
            for daemon in ("slurmctld", "slurmd"):
                _run([daemon], timeout=30)  # both fork into the background once their pid file is due
                started.append(_read_pid(state_dir / "run" / f"{daemon}.pid"))
            _wait_idle(cluster, timeout)
            yield cluster
        finally:
            for pid in reversed(started):
                _stop_pid(pid)
            for daemon in ("slurmctld", "slurmd"):
                (state_dir / "run" / f"{daemon}.pid").unlink(missing_ok=True)
