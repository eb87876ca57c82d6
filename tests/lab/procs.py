"""Start, record and end the lab's own processes.

Every process the lab starts is appended to pids.jsonl with its PID and the start
time the kernel reports in /proc/PID/stat, so a later `down`, even from another
Python process, ends exactly those processes and never a recycled PID.
"""

import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRecord:
    """A process the lab started, identified by PID and kernel start time."""

    pid: int
    start_time: int
    role: str
    qube: str = ""

    def to_json(self):
        return asdict(self)


def read_stat(pid):
    """Return (state, start_time) of *pid* from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def is_alive(record):
    """Return True if the recorded process still runs (zombies count as ended)."""
    stat = read_stat(record.pid)
    if stat is None:
        return False
    state, start_time = stat
    return start_time == record.start_time and state not in ("Z", "X")


def record_for(pid, role, qube=""):
    stat = read_stat(pid)
    if stat is None:
        raise ProcessLookupError(f"process {pid} ({role}) ended before it was recorded")
    return ProcessRecord(pid=pid, start_time=stat[1], role=role, qube=qube)


class ProcessRegistry:
    """Append-only record of the processes of one lab run (pids.jsonl)."""

    def __init__(self, path):
        self.path = path

    def add(self, record):
        line = json.dumps(record.to_json(), sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as records:
            fcntl.flock(records, fcntl.LOCK_EX)
            records.write(line)
        return record

    def record(self, pid, role, qube=""):
        return self.add(record_for(pid, role, qube))

    def spawn(self, argv, role, qube="", **popen_kwargs):
        """Start *argv* in a new session and record it; return (Popen, record)."""
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(argv, start_new_session=True, **popen_kwargs)
        try:
            record = self.record(process.pid, role, qube)
        except ProcessLookupError:
            # It ended already; keep a record anyway so nothing is left unaccounted.
            record = ProcessRecord(process.pid, -1, role, qube)
        log.debug("started %s (%s) pid %d: %s", role, qube or "-", process.pid, argv)
        return process, record

    def records(self):
        try:
            with open(self.path, encoding="utf-8") as records:
                fcntl.flock(records, fcntl.LOCK_SH)
                lines = records.read().splitlines()
        except FileNotFoundError:
            return []
        return [ProcessRecord(**json.loads(line)) for line in lines if line.strip()]

    def alive(self):
        return [record for record in self.records() if is_alive(record)]


def send_signal(record, signum):
    """Send *signum* to the recorded process if it is still that process."""
    if not is_alive(record):
        return False
    try:
        os.kill(record.pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_ended(records, timeout):
    """Wait until none of *records* is alive; return the ones still alive."""
    deadline = time.monotonic() + timeout
    remaining = [record for record in records if is_alive(record)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [record for record in remaining if is_alive(record)]
    return remaining


def end_processes(records, timeout=5.0, first_signal=signal.SIGTERM):
    """Signal *records*, then SIGKILL those still alive after *timeout* seconds.

    Returns the records that survived SIGKILL (normally none).
    """
    for record in records:
        send_signal(record, first_signal)
    survivors = wait_ended(records, timeout)
    for record in survivors:
        log.warning("process %d (%s) ignored signal %d, killing it", record.pid, record.role, first_signal)
        send_signal(record, signal.SIGKILL)
    return wait_ended(survivors, 5.0)
