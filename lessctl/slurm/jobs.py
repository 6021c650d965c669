"""Job states from squeue, sacct and scontrol, with array tasks aggregated into one state per job."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from lessctl.errors import LessctlError

log = logging.getLogger(__name__)


TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)
_FAILED_STATES = TERMINAL_STATES - {"COMPLETED"}
_ACTIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})


# ----------------------------------------------------------------------------- states


@dataclass(frozen=True)
class JobState:
    """A job's state; for an array, the state of the whole and of each task."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ... or UNKNOWN (Slurm forgot it)
    reason: str = ""
    tasks: dict = field(default_factory=dict)  # task id -> state (arrays only)
    source: str = ""  # squeue, sacct or scontrol

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES or self.state == "UNKNOWN"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_id(raw: str) -> tuple[str, str | None]:
    """'123' -> ('123', None); '123_4' -> ('123', '4'); '123_[5-7]' -> ('123', '[5-7]')."""
    job, _, task = raw.partition("_")
    return job, (task or None)


def _aggregate(job_id: str, records: list[tuple[str | None, str, str]], source: str) -> JobState:
    """records: (task id or None, state, reason) of one job."""
    states = [s for _, s, _ in records]
    tasks = {t: s for t, s, _ in records if t is not None}
    if any(s in _FAILED_STATES for s in states):
        state = next(s for s in states if s in _FAILED_STATES)
    elif any(s in _ACTIVE_STATES for s in states):
        state = "RUNNING"
    elif all(s == "COMPLETED" for s in states):
        state = "COMPLETED"
    else:
        state = next((s for s in states if s != "COMPLETED"), states[0])
    reason = next((r for _, s, r in records if s == state and r and r not in ("None", "(null)")), "")
    return JobState(job_id, state, reason, tasks, source)


def _run(cmd: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not answer within %s s", cmd[0], timeout_s)
        return None


def parse_squeue(text: str) -> dict[str, list[tuple[str | None, str, str]]]:
    """Lines `%i|%T|%r` (squeue -r) -> {job id: [(task, state, reason)]}."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        job, task = _split_id(parts[0])
        out.setdefault(job, []).append((task, parts[1].split()[0].upper(), parts[2] if len(parts) > 2 else ""))
    return out


def parse_sacct(text: str) -> dict[str, list[tuple[str | None, str, str]]]:
    """Lines `JobID|State|ExitCode` (sacct -n -P -X) -> {job id: [(task, state, exit code)]}."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        job, task = _split_id(parts[0])
        state = parts[1].split()[0].upper() if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0"
        exit_code = parts[2] if len(parts) > 2 else ""
        out.setdefault(job, []).append((task, state, "" if exit_code in ("0:0", "") else f"exit {exit_code}"))
    return out


def parse_scontrol(text: str) -> list[tuple[str | None, str, str]]:
    """`scontrol show job -o` records of one job -> [(task, state, reason)]."""
    out = []
    for line in text.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if "JobState" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        out.append((task if task and task != "N/A" else None, fields["JobState"].upper(), fields.get("Reason", "")))
    return out


def job_states(job_ids: Sequence[str]) -> dict[str, JobState]:
    """The state of each job: squeue (jobs slurmctld still holds), then sacct, then scontrol."""
    ids = [str(j) for j in job_ids if j]
    result: dict[str, JobState] = {}
    if not ids:
        return result
    if shutil.which("squeue") is None and shutil.which("sacct") is None:
        raise LessctlError("Slurm's squeue is not on PATH; run this on a Slurm login node (or load Slurm's module)")
    # -t all: finished jobs too, while slurmctld keeps them (MinJobAge); -r: one line per array task.
    proc = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if proc is not None and proc.returncode == 0:
        found = parse_squeue(proc.stdout)
        for j in ids:
            if j in found:
                result[j] = _aggregate(j, found[j], "squeue")
    missing = [j for j in ids if j not in result]
    if missing:
        proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,ExitCode"])
        if proc is not None and proc.returncode == 0:  # fails where accounting is not configured
            found = parse_sacct(proc.stdout)
            for j in missing:
                if j in found:
                    result[j] = _aggregate(j, found[j], "sacct")
    for j in [j for j in ids if j not in result]:
        proc = _run(["scontrol", "show", "job", "-o", j])
        records = parse_scontrol(proc.stdout) if proc is not None and proc.returncode == 0 else []
        result[j] = (
            _aggregate(j, records, "scontrol") if records else JobState(j, "UNKNOWN", "not known to Slurm any more")
        )
    return result


def wait_for(job_ids: Sequence[str], timeout_s: float = 120, poll_s: float = 0.5) -> dict[str, JobState]:
    """Polls until every job is finished (or Slurm forgot it); raises LessctlError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(job_ids)
        if all(s.done for s in states.values()):
            return states
        if time.monotonic() > deadline:
            pending = ", ".join(f"{j}={s.state}" for j, s in states.items() if not s.done)
            raise LessctlError(f"jobs still not finished after {timeout_s:.0f} s: {pending}")
        time.sleep(poll_s)
