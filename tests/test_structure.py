"""The package's shape: every module imports, imports form no cycle, every error has one root and
the command line maps errors to exit codes by that root."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import monitor
from monitor import cli
from monitor.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, MonitorError


def all_modules() -> list[ModuleType]:
    names = ["monitor"] + [m.name for m in pkgutil.walk_packages(monitor.__path__, "monitor.")
                           if not m.name.endswith("__main__")]  # a __main__ runs a command when imported
    return [importlib.import_module(name) for name in sorted(names)]


PACKAGE = Path(monitor.__file__).parent


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Which modules of the package each module imports, anywhere in it (inside functions too: a
    cycle closed at run time is still a cycle)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # `from pkg import module` imports the module
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                    if target in files:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each a path that comes back to where it starts."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_every_module_imports() -> None:
    modules = all_modules()
    assert {m.__name__ for m in modules} >= {"monitor.cli", "monitor.replay", "monitor.engine.support"}
    assert len(modules) == len([n for n in module_files() if not n.endswith("__main__")])


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert "monitor.demo" in graph["monitor.cli"] and "monitor.errors" in graph["monitor.policy"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


# the Kafka-free core (README: core.py) and what it is built from
CORE = ["monitor.models", "monitor.core", "monitor.state", "monitor.limits", "monitor.policy",
        "monitor.sandbox", "monitor.engine"]
# the Kafka runtime, the SDK and the front ends around it
AROUND = {"monitor.runtime", "monitor.changelog", "monitor.worker", "monitor.worker_process",
          "monitor.client", "monitor.topics", "monitor.broker", "monitor.metrics", "monitor.cli",
          "monitor.api", "monitor.replay", "monitor.demo"}
OUTSIDE = {"confluent_kafka", "fastapi", "uvicorn", "prometheus_client", "rich"}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def external_imports(f: Path) -> set[str]:
    """The top-level names of what a module imports from outside the package."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_the_core_imports_neither_kafka_nor_what_runs_around_it() -> None:
    graph, files = import_graph(), module_files()
    core = [m for m in files if any(m == c or m.startswith(c + ".") for c in CORE)]
    assert "monitor.engine.incremental" in core
    for name in core:
        below = reachable(graph, name) | {name}
        assert sorted(m for m in below if m in AROUND or m.rpartition(".")[0] in AROUND) == [], name
        assert sorted(set().union(*(external_imports(files[m]) for m in below)) & OUTSIDE) == [], name


def test_the_import_direction_check_sees_a_path_through_others() -> None:
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def test_every_exception_of_the_package_derives_from_monitor_error() -> None:
    found = {
        f"{module.__name__}.{name}": cls
        for module in all_modules()
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
    }
    assert len(found) >= 15, sorted(found)
    assert [name for name, cls in found.items() if not issubclass(cls, MonitorError)] == []


def test_errors_keep_the_bases_callers_catch_and_say_their_exit_code() -> None:
    from monitor.client import BrokerUnreachable, VerdictTimeout
    from monitor.policy import PolicyLoadError
    from monitor.samples import SampleError

    assert issubclass(VerdictTimeout, TimeoutError)
    assert issubclass(PolicyLoadError, ValueError) and issubclass(SampleError, ValueError)
    assert (BrokerUnreachable.exit_code, PolicyLoadError.exit_code, SampleError.exit_code) == (
        EXIT_UNREACHABLE, EXIT_USAGE, EXIT_USAGE)
    assert MonitorError.exit_code == EXIT_FAILED


@pytest.mark.parametrize("exit_code", [EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, 42])
def test_the_cli_exits_with_the_error_s_own_code(exit_code: int, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    class Odd(MonitorError):
        pass

    Odd.exit_code = exit_code

    def fail(args: object) -> int:
        raise Odd("something is off")

    monkeypatch.setattr(cli, "cmd_broker", fail)
    assert cli.main(["broker", "status"]) == exit_code
    assert capsys.readouterr().err == "agent-monitor: something is off\n"


def test_the_package_says_it_is_typed() -> None:
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["monitor"]
    assert (PACKAGE / "py.typed").is_file()
