"""deploy/local/with-dockerd with stand-ins for `docker` and `dockerd` on PATH (no Docker needed)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local" / "with-dockerd"


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """`docker version` answers once the fake dockerd has written its pid file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\ntest -e {tmp_path}/dockerd.pid\n')
    (bin_dir / "docker").chmod(0o755)
    return bin_dir


def _run(fake_bin: Path, dockerd: str, *cmd: str) -> subprocess.CompletedProcess:
    (fake_bin / "dockerd").write_text(dockerd)
    (fake_bin / "dockerd").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}",
               AGENT_MONITOR_DOCKERD_LOG=str(fake_bin.parent / "dockerd.log"))
    return subprocess.run([str(SCRIPT), *cmd], env=env, capture_output=True, text=True, timeout=60)


def test_a_dockerd_it_starts_is_stopped_after_the_command_with_the_commands_exit_code(fake_bin):
    pid_file = fake_bin.parent / "dockerd.pid"
    proc = _run(fake_bin, f'#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n', "sh", "-c", "echo ran; exit 3")
    if os.geteuid() != 0:
        assert proc.returncode == 1 and "needs root" in proc.stderr and "ran" not in proc.stdout
        return
    assert proc.returncode == 3 and "ran" in proc.stdout
    assert "starting dockerd" in proc.stderr and "stopping the dockerd started here" in proc.stderr
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the dockerd it started still runs"


def test_a_dockerd_that_cannot_start_fails_loudly_and_the_command_never_runs(fake_bin):
    proc = _run(fake_bin, "#!/bin/sh\necho 'failed to start daemon: boom' >&2\nexit 1\n", "sh", "-c", "echo ran")
    assert proc.returncode == 1 and "ran" not in proc.stdout
    if os.geteuid() != 0:
        assert "needs root" in proc.stderr
        return
    assert "dockerd exited at start" in proc.stderr and "boom" in proc.stderr


def test_a_daemon_that_answers_is_used_as_it_is(fake_bin):
    (fake_bin.parent / "dockerd.pid").write_text("1")  # `docker version` answers
    proc = _run(fake_bin, "#!/bin/sh\nexit 99\n", "sh", "-c", "echo ran; exit 0")
    assert proc.returncode == 0 and proc.stdout.strip() == "ran" and "dockerd" not in proc.stderr
