"""The policy sandbox: what a policy may import, and what policy code may do while it runs.

A policy is code: invariant-ai imports any module a policy names (``from os import system``,
``from builtins import eval``, ``from invariant.files import get_file_content``) and calls it. Here
that is closed in three layers, each of which stops the escapes the others would miss:

1. **Imports, before anything runs** (:func:`refusals`). A policy may import only invariant's own
   builtins and offline detectors (:data:`BUILTIN_IMPORTS`, by name: ``invariant.detectors`` also
   holds ``os`` and ``subprocess``), plus what the operator allows with ``--allow-import NAME``
   (:func:`set_allowed_imports`). Member names that start with ``_`` (``x.__class__``) are refused
   too: they lead out of the policy language into Python's internals. ``policy check``,
   ``policy publish`` and every load (worker, registry, replay, HTTP API) run this check on the
   parsed policy before invariant links it (linking executes the imported modules).
2. **Linking** (:func:`symbol_table`). A module outside the allow-list is refused again
   when invariant links it, and member access is limited to invariant's safe objects unless the
   operator allowed a module.
3. **While a policy runs** (:func:`guarded`). An audit hook (``sys.addaudithook``, installed once)
   refuses, in the context that evaluates a policy, network access (sockets, DNS, urllib, http),
   starting or signalling processes (``subprocess``, ``os.system``, ``exec*``, ``spawn*``,
   ``fork``, ``kill``), ``ctypes``, writing, removing or renaming files, and reading files or
   listing folders outside the Python installation and the import path. Elsewhere (the Kafka
   loop, metrics, other requests) the hook returns at once: a check of a frozenset and, for the
   few watched events, a context variable.

The guard is a tripwire inside the worker's own process, not an isolation boundary: Python's
audit hooks can be bypassed by code that already runs arbitrary Python (that is what layer 1
prevents). CPU and memory are bounded only by the check's time budget.

Example::

    >>> from invariant.analyzer.language.parser import parse
    >>> text = 'from os import system\\nraise "x" if:\\n    (m: Message)\\n    system("id") == 0\\n'
    >>> [f"line {r.line}: {r.what}: {r.why[:24]}" for r in refusals(parse(text), text)]
    ['line 1: from os import system: module os is not allowed']
    >>> import os
    >>> with guarded():
    ...     os.system("true")
    Traceback (most recent call last):
    ...
    monitor.sandbox.PolicyEscape: the policy sandbox refused os.system while a policy was running (b'true')
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import re
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from monitor.errors import EXIT_FAILED, EXIT_USAGE, MonitorError

log = logging.getLogger("agent_monitor.sandbox")

# -- layer 1: imports ------------------------------------------------------------------------------

_NODES = frozenset({"Message", "ToolCall", "ToolOutput", "Function", "Event", "TextChunk", "Image", "Tool",
                    "ToolParameter", "Input", "text", "image"})
_ERRORS = frozenset({"Violation", "PolicyViolation", "ErrorInformation", "UpdateMessage",
                     "UpdateMessageHandler", "AccessDenied"})
_QUANTIFIERS = frozenset({"count", "forall"})
_IPL_BUILTINS = frozenset({"any", "empty", "find", "json_loads", "len", "match", "max", "min", "sum", "print",
                           "tuple", "tool_call", "server"})
# the detectors that work offline (semgrep and pii through monitor/detectors.py)
_DETECTORS = frozenset({"secrets", "copyright", "unicode", "python_code", "ipython_code", "semgrep", "pii",
                        "CodeIssue", "PythonDetectorResult"})

BUILTIN_IMPORTS: dict[str, frozenset[str]] = {
    "invariant": _NODES | _ERRORS | _QUANTIFIERS,
    "invariant.nodes": _NODES,
    "invariant.errors": _ERRORS,
    "invariant.quantifiers": _QUANTIFIERS,
    "invariant.builtins": _IPL_BUILTINS,
    "invariant.detectors": _DETECTORS,
    "invariant.parsers": frozenset({"html_code", "links"}),
    "invariant.access_control": frozenset({"should_allow_rbac"}),
}
"""Names a policy may import without ``--allow-import``: invariant's builtins and offline detectors."""

_NETWORK = "it calls a model over the network (OpenAI or Hugging Face), which a monitor worker must not reach"
REFUSED_NAMES: dict[tuple[str, str], str] = {
    ("invariant", "llm"): _NETWORK,
    ("invariant", "llm_confirm"): _NETWORK,
    ("invariant.detectors", "prompt_injection"): _NETWORK,
    ("invariant.detectors", "moderated"): _NETWORK,
    ("invariant.detectors", "is_similar"): _NETWORK,
    ("invariant.detectors", "embedding_similarity"): _NETWORK,
    ("invariant.detectors", "fuzzy_contains"): _NETWORK + " (when its regex misses)",
    ("invariant.parsers", "ocr"): "it runs an OCR program (a process)",
}
"""invariant names refused with a reason of their own (``--allow-import MODULE.NAME`` allows one)."""

REFUSED_MODULES: dict[str, str] = {
    "invariant.files": "it reads the worker's files (get_file_content read /etc/passwd)",
    "invariant.llm": _NETWORK,
    "os": "it runs programs and changes files", "subprocess": "it runs programs",
    "builtins": "it holds eval, exec, open and __import__", "socket": "it reaches the network",
    "urllib": "it reaches the network", "http": "it reaches the network", "requests": "it reaches the network",
    "shutil": "it changes files", "pathlib": "it reads and writes files", "io": "it reads and writes files",
    "importlib": "it imports any module", "ctypes": "it calls native code",
    "pickle": "it runs code while loading data", "sys": "it changes the interpreter",
}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_IMPORT_LINE = re.compile(r"^\s*(?:from\s+[\w.]+\s+import\b|import\s+[\w.]+)")

_allowed: tuple[str, ...] = ()


class SandboxConfigError(MonitorError, ValueError):
    """An ``--allow-import`` value that is not a dotted module or name."""

    exit_code = EXIT_USAGE


def set_allowed_imports(names: Iterable[str]) -> tuple[str, ...]:
    """Allow more imports in this process (``--allow-import NAME``, repeatable): a module (``re``
    allows ``import re``, ``from re import match`` and ``re``'s submodules) or one name of a
    module (``invariant.detectors.prompt_injection``). Returns the allowances now in force.

    >>> set_allowed_imports(["re"]); check_import("re", "match"); set_allowed_imports([])
    ('re',)
    ()
    """
    global _allowed
    names = tuple(dict.fromkeys(n.strip() for n in names))
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise SandboxConfigError(f"--allow-import {bad[0]!r}: expected a dotted module or name such as "
                                 "re or invariant.detectors.prompt_injection")
    _allowed = names
    return _allowed


def allowed_imports() -> tuple[str, ...]:
    """The operator's allowances in force (``--allow-import``), in the order given."""
    return _allowed


def _operator_allows(qualified: str, extra: Iterable[str]) -> bool:
    return any(qualified == a or qualified.startswith(a + ".") for a in extra)


def check_import(module: str, name: str | None, extra: Iterable[str] | None = None) -> str | None:
    """Why ``from module import name`` (``name=None``: ``import module``) is refused, or None.

    >>> check_import("invariant.detectors", "secrets") is None
    True
    >>> check_import("invariant.detectors", "subprocess")
    'invariant.detectors.subprocess is not one of the invariant builtins and offline detectors a policy may import'
    """
    extra = allowed_imports() if extra is None else tuple(extra)
    qualified = module if name is None else f"{module}.{name}"
    if _operator_allows(qualified, extra):
        return None
    if name is not None and name.startswith("_"):
        return f"{qualified} is private: a policy may not import names that start with _"
    if name is None:
        return (f"import {module} imports a whole module: a policy imports the names it needs (from "
                f"{module} import ...), or the operator allows the module with --allow-import {module}")
    if name in BUILTIN_IMPORTS.get(module, ()):
        return None
    reason = REFUSED_NAMES.get((module, name))
    if reason:
        return f"{qualified} is refused: {reason} (allow it with --allow-import {qualified})"
    top = next((m for m in (module, module.split(".")[0]) if m in REFUSED_MODULES), None)
    if top is not None:
        return (f"module {module} is not allowed: {REFUSED_MODULES[top]} (a policy may import only "
                f"invariant's builtins and detectors; --allow-import {module} allows it)")
    if module in BUILTIN_IMPORTS or module == "invariant" or module.startswith("invariant."):
        return f"{qualified} is not one of the invariant builtins and offline detectors a policy may import"
    return (f"module {module} is not allowed: a policy may import only invariant's builtins and detectors "
            f"(--allow-import {module} allows it)")


@dataclass(frozen=True)
class Refusal:
    """One thing the sandbox refuses in a policy text: where (1-based line), what, and why."""

    line: int | None
    what: str
    why: str


def _walk(node: Any, seen: set[int]) -> Iterator[Any]:
    from invariant.analyzer.language.ast import Node

    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item, seen)
        return
    if not isinstance(node, Node) or id(node) in seen:
        return
    seen.add(id(node))
    yield node
    for key, value in vars(node).items():
        if key not in ("location", "type", "scope"):
            yield from _walk(value, seen)


def refusals(root: Any, text: str, extra: Iterable[str] | None = None) -> list[Refusal]:
    """What the sandbox refuses in a parsed policy (invariant's ``PolicyRoot``), in text order:
    imports outside the allow-list and members that start with ``_``. Nothing is linked or run."""
    from invariant.analyzer.language.ast import Identifier, Import, MemberAccess

    extra = allowed_imports() if extra is None else tuple(extra)
    # invariant's Import nodes carry no location: the n-th import statement is on the n-th import line
    import_lines = [n + 1 for n, line in enumerate(text.split("\n")) if _IMPORT_LINE.match(line)]
    out: list[Refusal] = []
    imports = 0
    for node in _walk(root, set()):
        if isinstance(node, Import):
            line = import_lines[imports] if imports < len(import_lines) else None
            imports += 1
            specs = node.import_specifiers or [None]
            for spec in specs:
                name = None if spec is None else spec.name
                why = check_import(node.module, name, extra)
                if why:
                    what = f"import {node.module}" if name is None else f"from {node.module} import {name}"
                    out.append(Refusal(line, what, why))
        elif isinstance(node, MemberAccess) and str(node.member).startswith("_"):
            line = node.location.line + 1 if node.location.line >= 0 else None
            out.append(Refusal(line, f".{node.member}", "members that start with _ lead out of the policy "
                               "language into Python's internals"))
        elif isinstance(node, Identifier) and str(node.name).startswith("__"):
            line = node.location.line + 1 if node.location.line >= 0 else None
            out.append(Refusal(line, str(node.name), "names that start with __ lead into Python's internals"))
    return sorted(out, key=lambda r: (r.line is None, r.line or 0))


def describe(refused: list[Refusal], where: str) -> str:
    """The message of a policy the sandbox refuses: one ``file:line: what: why`` per refusal."""
    return "\n".join(f"{where}{f':{r.line}' if r.line else ''}: refused by the policy sandbox: {r.what}: {r.why}"
                     for r in refused)


# -- layer 2: linking -----------------------------------------------------------------------------

def symbol_table(extra: Iterable[str] | None = None) -> Any:
    """invariant's symbol table with the sandbox's rules: modules are linked only when the operator
    allowed them (invariant's own are linked before a symbol table is asked), and members of plain
    Python objects are read only when the operator allowed a module: otherwise only invariant's
    safe values (events, strings, dicts, detector results) have members."""
    return _table_class()(tuple(allowed_imports() if extra is None else extra))


@functools.cache
def _table_class() -> type:
    # (built on first use: importing invariant-ai takes about a second)
    from invariant.analyzer.runtime.symbol_table import SymbolTable

    class SandboxSymbolTable(SymbolTable):
        def __init__(self, extra: tuple[str, ...] = ()) -> None:
            self.extra = extra

        def link_import(self, ref: Any) -> Any:
            qualified = ref.module if ref.obj is None else f"{ref.module}.{ref.obj}"
            if not (_operator_allows(ref.module, self.extra) or _operator_allows(qualified, self.extra)):
                raise ImportError(f"refused by the policy sandbox: {qualified}")
            return super().link_import(ref)

        def allows_module_interfacing(self) -> bool:
            return bool(self.extra)

    return SandboxSymbolTable


# -- layer 3: while a policy runs -------------------------------------------------------------------

class PolicyEscape(MonitorError, PermissionError):
    """Policy code tried something the sandbox refuses while it ran (network, a process, a file
    write or a read outside the import path). A PermissionError, so library code that expects one
    (importlib writing a bytecode cache, urllib) carries on or fails as for any refused operation;
    the check then fails closed."""

    exit_code = EXIT_FAILED


_RUNNING: contextvars.ContextVar[bool] = contextvars.ContextVar("agent_monitor_policy_running", default=False)

_NETWORK_EVENTS = frozenset({
    # (not socket.__new__: every asyncio loop makes a socketpair for itself; a socket reaches
    # nothing before connect, bind or sendto)
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "socket.getservbyname", "socket.getservbyport", "urllib.Request", "http.client.connect",
    "http.client.send", "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open",
    "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open",
})
_PROCESS_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "os.startfile", "pty.spawn", "signal.pthread_kill",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
    "sys.addaudithook", "sys.setprofile", "sys.settrace", "resource.setrlimit", "os.chdir", "os.setuid",
})
_CHANGE_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
    "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.lchown", "os.mkfifo", "os.mknod",
    "shutil.rmtree", "shutil.move", "shutil.chown", "tempfile.mkstemp", "tempfile.mkdtemp",
})
_READ_EVENTS = frozenset({"open", "os.listdir", "os.scandir", "glob.glob", "os.listxattr"})
WATCHED = _NETWORK_EVENTS | _PROCESS_EVENTS | _CHANGE_EVENTS | _READ_EVENTS
"""Audit events the guard looks at; every other event returns at the first test."""

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class _State:
    installed = False
    roots: tuple[str, ...] = ()
    refused = 0
    lock = threading.Lock()


def read_roots() -> tuple[str, ...]:
    """Folders a running policy may read from: the Python installation and the import path (an
    import may happen during a check), and the spaCy model folder the pii detector is given."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             *sysconfig.get_paths().values(), *(p or os.getcwd() for p in sys.path)}
    model = os.environ.get("AGENT_MONITOR_PII_SPACY_MODEL")
    if model and os.path.isdir(model):
        paths.add(model)
    roots = {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
    return tuple(sorted(r.rstrip(os.sep) + os.sep for r in roots if r != os.sep))


def _readable(path: Any) -> bool:
    if isinstance(path, int):
        return True  # an open descriptor: what it names was opened already
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    # (a path that does not exist reads nothing: linecache and the import system probe such paths)
    return (real in ("/dev/null", "/dev/urandom") or (real + os.sep).startswith(_State.roots)
            or not os.path.lexists(real))


def _is_write(args: tuple[Any, ...]) -> bool:
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _refuse(event: str, args: tuple[Any, ...]) -> None:
    shown = repr(args[0] if len(args) == 1 else args)
    message = f"the policy sandbox refused {event} while a policy was running ({shown[:200]})"
    token = _RUNNING.set(False)  # logging must not trip the guard itself
    try:
        with _State.lock:
            _State.refused += 1
        log.warning("%s", message)
    finally:
        _RUNNING.reset(token)
    raise PolicyEscape(message)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    # the whole cost outside a check: one frozenset test (and, for a watched event, one lookup)
    if event not in WATCHED or not _RUNNING.get():
        return
    if event in _READ_EVENTS:
        if event == "open" and _is_write(args):
            _refuse(event, args)
        if args and not _readable(args[0]):
            _refuse(event, args)
        return
    _refuse(event, args)


def install_guard() -> None:
    """Install the audit hook once per process (it cannot be removed; it does nothing outside
    :func:`guarded`)."""
    with _State.lock:
        if _State.installed:
            return
        _State.roots = read_roots()
        sys.addaudithook(_hook)
        _State.installed = True


class _Running:
    """Sets the context's running flag for a ``with`` block (a class, not a generator: it wraps
    every check, and costs a fifth of ``contextlib.contextmanager``'s)."""

    __slots__ = ("value", "token")

    def __init__(self, value: bool) -> None:
        self.value = value
        self.token: contextvars.Token[bool] | None = None

    def __enter__(self) -> None:
        if self.value and not _State.installed:
            install_guard()
        self.token = _RUNNING.set(self.value)

    def __exit__(self, *exc: object) -> None:
        assert self.token is not None  # noqa: S101 - __enter__ set it
        _RUNNING.reset(self.token)


def guarded() -> _Running:
    """Run policy code: within this context (and the tasks and ``asyncio.to_thread`` calls it
    starts), the operations listed in the module docstring raise :class:`PolicyEscape`."""
    return _Running(True)


def trusted() -> _Running:
    """Lift the guard for the project's own detector code (semgrep's scan writes a temporary file
    and runs the semgrep program); never reachable from a policy, which cannot import this module."""
    return _Running(False)


def running() -> bool:
    """True while policy code runs in this context."""
    return _RUNNING.get()


def refused_count() -> int:
    """Operations refused in this process so far (also those that library code caught), and those
    its engine processes reported (:func:`count_refused`)."""
    return _State.refused


def count_refused(n: int) -> None:
    """Add ``n`` operations refused in an engine process (:mod:`monitor.engine.isolation`)."""
    if n:
        with _State.lock:
            _State.refused += n


__all__ = ["BUILTIN_IMPORTS", "PolicyEscape", "Refusal", "SandboxConfigError",
           "allowed_imports", "check_import", "count_refused", "describe", "guarded", "install_guard", "refusals",
           "refused_count", "running", "set_allowed_imports", "symbol_table", "trusted"]
