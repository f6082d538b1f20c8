"""The one root of agent-monitor's exceptions, and the exit codes of the command line.

Every exception class of the project derives from :class:`MonitorError`, so a caller can catch all
of them at once, and ``agent-monitor`` turns any of them into a one-line message and its
``exit_code`` (a class attribute; an instance may carry its own):

- 0 ok, 1 the command ran but failed, 2 bad usage, unreadable input or a policy that does not
  parse, 3 no Kafka broker answered, 130 interrupted.

Example::

    >>> class SomethingOff(MonitorError):
    ...     exit_code = EXIT_USAGE
    >>> SomethingOff("no").exit_code, MonitorError("x").exit_code
    (2, 1)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class MonitorError(Exception):
    """Base class of every agent-monitor error; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_FAILED
