"""A monitor worker as a child process, as it runs in production: what the demo and the tests start.

The child is ``python -m monitor.worker SETTINGS_JSON``; it announces each partition assignment
with a line that starts with :data:`monitor.worker.READY_LINE`. Its stdout and stderr go to files,
not pipes, so a worker left running (``demo --keep``) never dies of a closed pipe once its parent
exits.

Example (needs a broker)::

    from monitor.config import WorkerSettings
    from monitor.worker_process import WorkerProcess

    with WorkerProcess(WorkerSettings(policy_path="examples/policies")) as worker:
        print(worker.ready_line, worker.assigned())
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from monitor.config import WorkerSettings
from monitor.errors import MonitorError
from monitor.worker import READY_LINE

REPO = Path(__file__).resolve().parent.parent  # the checkout: the child runs from here, as `make` does


class WorkerNotReady(MonitorError):
    """The worker exited, or did not announce its assignment in time; the message ends with its log."""


class WorkerProcess:
    """``python -m monitor.worker`` with ``settings``; :meth:`wait_ready` waits for its ready line.

    ``log_path`` takes its stderr and the same name with ``.out`` its stdout (default: a fresh
    temporary file).
    """

    def __init__(self, settings: WorkerSettings, log_path: Path | None = None) -> None:
        self.settings = settings
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="agent-monitor-worker-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""

    def start(self, new_session: bool = False) -> Self:
        """Start the child (``new_session``: in a session of its own, so that it outlives its
        parent's terminal); returns at once."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "monitor.worker", self.settings.model_dump_json()], cwd=REPO, env=env,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=new_session,
            )
        return self

    def ready_lines(self) -> list[str]:
        """Every ready line so far, from :data:`READY_LINE` on (one per assignment)."""
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            return []
        return [line[line.index(READY_LINE):] for line in text.splitlines() if READY_LINE in line]

    def assigned(self) -> list[int]:
        """The partitions of the latest assignment (none before the first ready line)."""
        lines = self.ready_lines()
        if not lines:
            return []
        part = lines[-1].rsplit("assigned=", 1)[-1]
        return [int(p) for p in part.split(",") if p]

    def wait_ready(self, timeout: float = 90.0, count: int = 1) -> None:
        """Wait for the ``count``-th ready line; :class:`WorkerNotReady` if the worker exits first
        or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.ready_lines()
            if len(lines) >= count:
                self.ready_line = lines[count - 1]
                return
            assert self.proc is not None, "start() the worker first"  # noqa: S101 - the message says why
            if self.proc.poll() is not None:
                raise WorkerNotReady(f"the worker exited with code {self.proc.returncode} before it was ready; "
                                     f"its log ends with:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise WorkerNotReady(f"the worker was not ready after {timeout:.0f}s "
                                     f"(no '{READY_LINE}' line); its log ends with:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of its stdout, then of its stderr."""
        parts = []
        for path in (self.out_path, self.log_path):
            try:
                parts.append(path.read_text(errors="replace")[-chars:])
            except OSError:
                pass
        return "\n".join(p.strip() for p in parts if p.strip())

    def kill(self) -> None:
        """SIGKILL: no shutdown, as a crashed machine would stop it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # a worker that never got ready must not outlive its caller
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
