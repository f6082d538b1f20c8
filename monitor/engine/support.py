"""What both engines share: invariant-ai's errors as matches, rule messages, deadlines, threads.

Example::

    >>> shift_address("0.content:3-5", 7), shift_key("(0, (1, 2))", 10)
    ('messages.7.content:3-5', '(0, (11, 12))')
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import threading
import time
import warnings
from collections.abc import Awaitable, Coroutine
from concurrent.futures import Future
from typing import Any

from monitor.engine.base import BudgetExceeded
from monitor.limits import MAX_ADDRESSES
from monitor.models import Match
from monitor.policy import rule_message as rule_message  # the engines import it from here

# The time budget, not an iteration count, bounds a check (invariant-ai reads this when it runs).
os.environ.setdefault("INVARIANT_MAX_ITERATIONS", str(10**12))

# invariant-ai warns with the whole event when one does not parse: an agent's event (up to a
# megabyte, terminal escapes and all) in the worker's log for every such record. The verdict's
# reason says it already.
warnings.filterwarnings("ignore", message="Could not parse event in the trace", category=UserWarning)

# events of the past the reference engine sees (and the incremental engine's uncompiled rules)
DEFAULT_MAX_HISTORY = 2000


def jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it, else its string (error arguments cross the wire).

    >>> jsonable([1, "a"]), jsonable({1, 2})
    ([1, 'a'], '{1, 2}')
    """
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def shift_address(address: str, offset: int) -> str:
    """``0.content:3-5`` counted in a window becomes ``messages.<offset>.content:3-5``."""
    head, _, rest = address.partition(".")
    if head.isdigit():
        head = str(int(head) + offset)
        return "messages." + head + ("." + rest if rest else "")
    return "messages." + address


def shift_key(key: Any, offset: int) -> str:
    """Error keys hold trace indices: ``(rule, (i, j))`` -> ``(rule, (i+offset, j+offset))``."""
    if offset == 0 or key is None:
        return str(key)
    try:
        rule, idx = ast.literal_eval(str(key))
        return str((rule, tuple(i + offset if isinstance(i, int) else i for i in idx)))
    except (ValueError, SyntaxError, TypeError):
        return str(key)


def error_message(error: Any) -> str:
    """The message of an invariant-ai ``ErrorInformation``: its arguments, as invariant prints them."""
    return " ".join(str(a) for a in error.args)


def error_kwargs(error: Any) -> dict[str, Any]:
    """The keyword arguments of an ``ErrorInformation``, each one JSON can hold."""
    return {k: jsonable(v) for k, v in error.kwargs.items()}


def error_to_match(error: Any, offset: int, rule_index: int | None = None, key: str | None = None) -> Match:
    """Turn an invariant-ai ``ErrorInformation`` into a :class:`Match` with whole-trace addresses.

    ``key`` and ``rule_index`` default to the error's own key shifted by ``offset``, and the rule
    that key names.
    """
    if key is None:
        key = shift_key(error.key, offset)
    if rule_index is None:
        try:
            rule_index = ast.literal_eval(key)[0]
        except (ValueError, SyntaxError, TypeError, IndexError):
            rule_index = -1
    return Match(
        rule_index=rule_index,
        message=error_message(error),
        key=key,
        addresses=[shift_address(r.json_path, offset) for r in error.ranges[:MAX_ADDRESSES]],
        kwargs=error_kwargs(error),
    )


async def within(awaitable: Awaitable[Any], deadline: float | None) -> Any:
    """Await ``awaitable``, raising :class:`BudgetExceeded` once ``deadline`` (perf_counter) passes."""
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        raise BudgetExceeded("the check ran past its deadline") from None


class _LoopThread:
    """A daemon thread running its own asyncio loop, for evaluations we may have to abandon."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()
        self.busy = 0
        self._lock = threading.Lock()

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        with self._lock:
            self.busy += 1
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()  # cancels the task on the other loop at its next await
            raise

    async def _tracked(self, coro: Coroutine[Any, Any, Any]) -> Any:
        # busy until the work really ends on this thread, not when its caller gave up on it
        try:
            return await coro
        finally:
            with self._lock:
                self.busy -= 1

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


class LoopPool:
    """Evaluation threads: a check abandoned at its time budget may still be unwinding on its thread,
    so the next check takes an idle thread instead of queueing behind it (at most ``size`` threads)."""

    def __init__(self, name: str, size: int = 4) -> None:
        self.name = name
        self.size = size
        self.threads: list[_LoopThread] = []

    async def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        idle = next((t for t in self.threads if t.busy == 0), None)
        if idle is None and len(self.threads) < self.size:
            idle = _LoopThread(f"{self.name}-{len(self.threads)}")
            self.threads.append(idle)
        if idle is None:  # every thread is still unwinding an abandoned check: queue on the least busy
            idle = min(self.threads, key=lambda t: t.busy)
        return await idle.run(coro)

    def close(self) -> None:
        for t in self.threads:
            t.close()
