"""argparse argument types whose errors say what is expected (``expected a whole number >= 1, got 0``).

Example::

    >>> int_at_least(1)("3"), positive_float("0.5"), host_ports("kafka-1:9092,kafka-2:9092")
    (3, 0.5, 'kafka-1:9092,kafka-2:9092')
    >>> port("70000")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a TCP port 1-65535, got 70000
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def _number(text: str, kind: Callable[[str], N], ok: Callable[[N], bool], expected: str) -> N:
    """``text`` read as ``kind``, if ``ok`` holds for it; else an error that says what is expected."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        # a whole number as read (007 is 7), a number as typed (-5, not -5.0)
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value if isinstance(value, int) else text}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _number(text, int, lambda v: v >= low, f"a whole number >= {low}")

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "a number >= 0")


def port(text: str) -> int:
    return _number(text, int, lambda v: 1 <= v <= 65535, "a TCP port 1-65535")


def host_ports(text: str) -> str:
    for part in text.split(","):
        host, sep, number = part.strip().rpartition(":")
        if not sep or not host or not number.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return text


def metrics_url(text: str) -> str:
    """A worker's /metrics URL from ``HOST:PORT`` or an http(s) URL (:func:`monitor.top.metrics_url`)."""
    from monitor.top import metrics_url as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def kinds_of(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma-separated list of some of ``allowed`` (``timeout,error``).

    >>> kinds_of(("timeout", "error"))("error, timeout")
    ['error', 'timeout']
    >>> kinds_of(("timeout", "error"))("all")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected some of timeout, error (comma-separated), got 'all'
    """

    def parse(text: str) -> list[str]:
        got = [k.strip() for k in text.split(",") if k.strip()]
        if not got or any(k not in allowed for k in got):
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)} (comma-separated), "
                                             f"got {text!r}")
        return got

    parse.__name__ = "kinds"
    return parse
