"""A throwaway single-node Slurm on localhost for tests: munged, slurmctld and slurmd in a tmp folder.

Everything lives under one folder (config, munge key and socket, state, spool, logs); the daemons
run in the foreground as children of the test process, on free ports, and are killed on stop().
Clients find the cluster through SLURM_CONF, which `env()` returns (and jobs inherit).
Needs root (slurmd runs jobs as their user) and Debian's `slurm-wlm` and `munge`
(`.ci/install-slurm.sh`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
DAEMONS = ("munged", "slurmctld", "slurmd")


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not always on PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a local Slurm cannot be started here (None: it can be tried)."""
    missing = [b for b in (*CLIENTS, *DAEMONS) if _which(b) is None]
    if missing:
        return (
            f"Slurm is not installed (missing {', '.join(missing)}); "
            "install slurm-wlm and munge with .ci/install-slurm.sh"
        )
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs jobs as their user)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """One slurmctld and one slurmd (`NodeName=localhost`) with their own munged."""

    def __init__(self, root: Path, cpus: int | None = None, min_job_age_s: int = 600):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.min_job_age_s = min_job_age_s
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.partition = "debug"
        self._procs: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        """Environment entries a client (and every job) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged wants clients able to reach its socket
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=lessctltest",
            # slurmctld insists on running on the host named here; its address is loopback.
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            # No cgroups: processes are tracked through /proc, tasks are not confined.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age_s}",
            "KillWait=2",
            "InactiveLimit=0",
            # The configured node is trusted over what slurmd detects (hyperthreads, memory).
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # Read only if a cgroup plugin is loaded; written so that no system cgroup.conf is picked up.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "wb")
        env = {**os.environ, **self.env()}
        proc = subprocess.Popen(
            [_which(name), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        out.close()
        self._procs.append(proc)

    def _wait(self, what: str, check, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which(cmd[0]), *cmd[1:]], capture_output=True, text=True, env={**os.environ, **self.env()}, timeout=30
        )

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        self._write_config()
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.root / 'munge' / 'munge.key'}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                f"--log-file={self.logs / 'munged.log'}",
            ],
        )
        self._wait("munged's socket", self.munge_socket.exists, timeout_s)
        # -i: ignore (missing) state files; -D: stay in the foreground, a child we can kill.
        self._spawn("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self._run("scontrol", "ping").returncode == 0, timeout_s)
        self._spawn("slurmd", ["-D", "-N", "localhost", "-f", str(self.conf)])

        def idle() -> bool:
            p = self._run("sinfo", "-h", "-N", "-o", "%T")
            return p.returncode == 0 and p.stdout.strip().rstrip("*") == "idle"

        self._wait("node localhost to be idle (sinfo)", idle, timeout_s)
        return self

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancels what is left and kills the daemons (slurmd, slurmctld, munged: reverse order)."""
        if any(p.poll() is None for p in self._procs):
            try:
                self._run("scancel", "--user=root")
            except Exception:
                pass
        for p in reversed(self._procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self._procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self._procs.clear()
