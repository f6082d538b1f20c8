"""The policy sandbox: each escape refused at check and load (imports), and, when an operator allows
the import, refused again while the policy runs (the audit-hook guard), on both engines."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from monitor import sandbox
from monitor.cli import main
from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator
from monitor.policy import PolicyLoadError, PolicySet, load_policy_text
from monitor.state import SessionStore

RULE = 'raise "ran" if:\n    (m: Message)\n'

# (import line, a rule condition that uses it); {marker} is a file the escape would create
ESCAPES = {
    "os.system": ("from os import system", 'system("touch {marker}") == 0'),
    "subprocess": ("from subprocess import run", 'run(["touch", "{marker}"])'),
    "builtins.eval": ("from builtins import eval", 'eval("__import__(\'os\').system(\'touch {marker}\')") == 0'),
    "builtins.exec": ("from builtins import exec", 'exec("open(\'{marker}\', \'w\')") is None'),
    "builtins.open": ("from builtins import open", 'open("{marker}", "w")'),
    "invariant.files": ("from invariant.files import get_file_content",
                        'c := get_file_content("/etc", "passwd")\n    "root" in c.content'),
    "urllib": ("from urllib.request import urlopen", 'urlopen("http://127.0.0.1:{port}/" + m.content)'),
    "socket": ("from socket import create_connection", 'create_connection(["127.0.0.1", {port}])'),
}
ALLOW = {"os.system": "os", "subprocess": "subprocess", "builtins.eval": "builtins", "builtins.exec": "builtins",
         "builtins.open": "builtins", "invariant.files": "invariant.files", "urllib": "urllib", "socket": "socket"}


@pytest.fixture(autouse=True)
def _no_allowances():
    sandbox.set_allowed_imports([])
    yield
    sandbox.set_allowed_imports([])


def policy_text(name: str, marker: Path, port: int = 9) -> str:
    imp, cond = ESCAPES[name]
    return f"{imp}\n\n{RULE}    {cond.format(marker=marker, port=port)}\n"


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_policy_check_refuses_each_escape_with_file_line_and_why(name: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "escape.gr"
    path.write_text(policy_text(name, tmp_path / "marker"))
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    module = ESCAPES[name][0].split()[1]
    assert f"{path}:1: refused by the policy sandbox: {ESCAPES[name][0]}: module {module} is not allowed" in err
    assert "--allow-import" in err
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_loading_refuses_each_escape_before_linking(name: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policy_text(policy_text(name, tmp_path / "marker"), "p", source="p.gr")
    assert err.value.line == 1 and "refused by the policy sandbox" in str(err.value)


@pytest.mark.parametrize(("text", "line", "why"), [
    ("from invariant.detectors import subprocess\n" + RULE + "    m.content == 'x'\n", 1,
     "invariant.detectors.subprocess is not one of the invariant builtins"),
    ("from invariant.detectors import prompt_injection\n" + RULE + "    prompt_injection(m.content)\n", 1,
     "over the network"),
    ("from invariant import llm\n" + RULE + "    llm(m.content) == 'x'\n", 1, "over the network"),
    ("from invariant.parsers import ocr\n" + RULE + "    any(ocr(m.content))\n", 1, "OCR program"),
    ("import this\n" + RULE + "    m.content == 'x'\n", 1, "imports a whole module"),
    ("# a comment\n" + RULE + "    m.content.__class__ == 'x'\n", 4, "members that start with _"),
    ("from invariant.detectors import _private\n" + RULE + "    m.content == 'x'\n", 1, "is private"),
])
def test_other_refusals_name_the_line_and_reason(text: str, line: int, why: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policy_text(text, "p", source="p.gr")
    assert err.value.line == line and why in str(err.value)
    assert capsys.readouterr().out == ""  # `import this` would print the Zen of Python at link time


def test_invariant_builtins_and_detectors_stay_allowed() -> None:
    text = ("from invariant import count, Message, ToolCall, PolicyViolation\n"
            "from invariant.detectors import secrets, semgrep, pii, copyright, unicode, python_code, CodeIssue\n"
            + RULE + "    any(secrets(m.content))\n")
    assert len(load_policy_text(text, "ok").rules) == 1


def test_an_operator_allowance_lets_a_module_in() -> None:
    text = "from fnmatch import fnmatchcase\n" + RULE + '    fnmatchcase(m.content, "a*")\n'
    with pytest.raises(PolicyLoadError, match="module fnmatch is not allowed"):
        load_policy_text(text, "fn1")
    sandbox.set_allowed_imports(["fnmatch"])
    policy = load_policy_text(text, "fn2")
    out = _check(policy, "aaa")
    assert out.verdict.decision == "deny" and out.verdict.reason is None


def test_an_allowance_must_be_a_dotted_name() -> None:
    with pytest.raises(sandbox.SandboxConfigError, match="expected a dotted module"):
        sandbox.set_allowed_imports(["os; rm -rf /"])


def _check(policy, content: str, engine: str = "incremental"):
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-", engine=engine))
    record = json.dumps({"session_id": "s", "batch_id": "b",
                         "events": [{"role": "user", "content": content}]}).encode()
    try:
        return asyncio.run(core.process_record(SessionStore({}), b"s", record, None))
    finally:
        core.close()


class Listener:
    """A TCP listener on loopback that records whatever reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(1)
            try:
                self.received.append(conn.recv(4096))
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.mark.parametrize("engine", ["incremental", "reference"])
@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_the_guard_refuses_each_escape_while_the_policy_runs(name: str, engine: str, tmp_path: Path) -> None:
    """With the import allowed by the operator, the escape is tried at run time: it must fail and
    the batch be denied (fail closed), with nothing created and nothing received."""
    listener = Listener()
    marker = tmp_path / "marker"
    try:
        sandbox.set_allowed_imports([ALLOW[name]])
        policy = load_policy_text(policy_text(name, marker, listener.port), f"{name}-{engine}")
        before = sandbox.refused_count()
        out = _check(policy, "a secret the policy must not send", engine)
    finally:
        listener.close()
    assert out.verdict.decision == "deny"
    assert "the policy sandbox refused" in (out.verdict.reason or ""), out.verdict
    assert out.verdict.violations == []  # the escape never turned into a match either
    assert sandbox.refused_count() > before
    assert not marker.exists()
    assert listener.connections == 0 and listener.received == []


def test_the_guard_is_off_outside_a_check(tmp_path: Path) -> None:
    sandbox.install_guard()
    (tmp_path / "written").write_text("the worker itself may write")
    assert os.system("true") == 0  # noqa: S605 - the worker itself may start a shell
    with sandbox.guarded():
        with pytest.raises(sandbox.PolicyEscape, match="open"):
            (tmp_path / "refused").write_text("x")
        with sandbox.trusted():  # the project's own detector code
            (tmp_path / "trusted").write_text("x")
    assert not (tmp_path / "refused").exists() and (tmp_path / "trusted").exists()


def test_the_guard_follows_the_check_into_threads_and_tasks(tmp_path: Path) -> None:
    async def main_task() -> None:
        def write() -> None:
            (tmp_path / "from-thread").write_text("x")

        with sandbox.guarded():
            with pytest.raises(sandbox.PolicyEscape):
                await asyncio.to_thread(write)
            with pytest.raises(sandbox.PolicyEscape):
                await asyncio.create_task(asyncio.to_thread(write))
        await asyncio.to_thread(write)  # after the check: allowed again

    asyncio.run(main_task())
    assert (tmp_path / "from-thread").exists()


def test_reads_outside_the_import_path_are_refused_and_inside_allowed() -> None:
    with sandbox.guarded():
        with pytest.raises(sandbox.PolicyEscape):
            open("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd").close()
        open(sandbox.__file__).close()  # the package itself: imports read here


def test_detectors_that_run_programs_still_work_in_the_sandbox() -> None:
    """semgrep writes a temporary file and runs a program, pii loads spaCy: both are the project's
    own code (sandbox.trusted), so a policy that calls them still gets its verdict."""
    from monitor.policy import load_policy

    semgrep = load_policy(Path(__file__).resolve().parents[2] / "examples" / "policies" / "semgrep_in_code.gr")
    core = BatchEvaluator(PolicySet.single(semgrep), WorkerSettings(policy_path="-"))
    call = {"type": "function", "id": "1", "function": {"name": "ipython_run_cell",
                                                        "arguments": {"code": "import os\nos.system(input())"}}}
    record = json.dumps({"session_id": "s", "batch_id": "b", "events": [call]}).encode()
    try:
        out = asyncio.run(core.process_record(SessionStore({}), b"s", record, None))
    finally:
        core.close()
    assert out.verdict.decision == "deny" and out.verdict.reason is None
    pii = load_policy_text("from invariant.detectors import pii\n" + RULE + "    any(pii(m.content))\n", "pii")
    out = _check(pii, "write to bob@example.com")
    assert out.verdict.decision == "deny" and out.verdict.reason is None, out.verdict


def test_the_module_examples_run() -> None:
    import doctest

    result = doctest.testmod(sandbox, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0
