"""The package's shape: every module imports, imports form no cycle, every error has one root and
the command line maps errors to exit codes by that root."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import monitor
from monitor import cli
from monitor.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, MonitorError


def all_modules() -> list[ModuleType]:
    names = [m.name for m in pkgutil.walk_packages(monitor.__path__, "monitor.")
             if not m.name.endswith("__main__")]  # a __main__ runs a command when imported
    return [importlib.import_module(name) for name in sorted(names)]


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
