"""What several commands of ``agent-monitor`` share: the Kafka flags, how their defaults are
found, and the error a user can fix.

Example::

    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> kafka_args(p)
    >>> args = p.parse_args(["--prefix", "staging", "-b", "kafka-1:9092"])
    >>> bootstrap_of(args), prefix_of(args)
    ('kafka-1:9092', 'staging')
"""

from __future__ import annotations

import argparse
import os

from monitor.argtypes import host_ports, positive_float
from monitor.config import DEFAULT_BOOTSTRAP, DEFAULT_PREFIX
from monitor.errors import EXIT_USAGE, MonitorError


class CliError(MonitorError):
    """A problem the user can fix; printed without a traceback, exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_bootstrap() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS``, else the broker ``agent-monitor broker start`` runs, else
    127.0.0.1:9092."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        return env
    try:
        from monitor.broker import daemon_status

        info = daemon_status()
    except Exception:  # noqa: BLE001 - no recorded broker is the common case
        info = None
    return info.bootstrap_servers if info else DEFAULT_BOOTSTRAP


def kafka_args(p: argparse.ArgumentParser) -> None:
    """``--bootstrap-servers``, ``--prefix`` and ``--connect-timeout``."""
    p.add_argument("--bootstrap-servers", "-b", type=host_ports, metavar="HOST:PORT",
                   help="Kafka cluster (default: $KAFKA_BOOTSTRAP_SERVERS, else the broker of "
                        "`agent-monitor broker start`, else 127.0.0.1:9092)")
    p.add_argument("--prefix", metavar="PREFIX",
                   help=f"topic name prefix (default: $AGENT_MONITOR_PREFIX, else {DEFAULT_PREFIX!r})")
    p.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to answer (default 10)")


def allow_import_arg(p: argparse.ArgumentParser) -> None:
    """``--allow-import NAME`` (repeatable): what the policy sandbox allows beyond invariant's
    builtins and detectors (see :mod:`monitor.sandbox`)."""
    p.add_argument("--allow-import", action="append", metavar="NAME",
                   help="let policies import this module (re), or one name of a module "
                        "(invariant.detectors.prompt_injection); repeatable. Without it a policy may "
                        "import only invariant's builtins and offline detectors")


def bootstrap_of(args: argparse.Namespace) -> str:
    return args.bootstrap_servers or default_bootstrap()


def prefix_of(args: argparse.Namespace) -> str:
    return args.prefix or os.environ.get("AGENT_MONITOR_PREFIX") or DEFAULT_PREFIX
