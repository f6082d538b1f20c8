"""The reference engine: invariant-ai's own local evaluator on (past, pending).

Correct by definition but its cost grows with the session (it rebuilds its input on every call),
so the past it sees is bounded by ``max_history`` events, and it runs on a thread of its own so a
slow policy never holds the worker's event loop.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

from monitor.engine.base import BudgetExceeded, CheckResult, Engine, EngineError, RuleInfo, SessionState
from monitor.models import Match
from monitor.policy import LoadedPolicy

# The time budget, not an iteration count, bounds a check here.
os.environ.setdefault("INVARIANT_MAX_ITERATIONS", str(10**12))

DEFAULT_MAX_HISTORY = 2000


def jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it, else its string (error arguments cross the wire)."""
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


def error_to_match(error: Any, offset: int, rule_index: int | None = None) -> Match:
    """Turn an invariant-ai ``ErrorInformation`` into a :class:`Match` with whole-trace addresses."""
    key = shift_key(error.key, offset)
    try:
        rule = ast.literal_eval(key)[0] if rule_index is None else rule_index
    except (ValueError, SyntaxError, TypeError, IndexError):
        rule = -1
    message = " ".join(str(a) for a in error.args)
    return Match(
        rule_index=rule,
        message=message,
        key=key,
        addresses=[shift_address(r.json_path, offset) for r in error.ranges],
        kwargs={k: jsonable(v) for k, v in error.kwargs.items()},
    )


async def within(awaitable: Any, deadline: float | None) -> Any:
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

    async def run(self, coro) -> Any:
        with self._lock:
            self.busy += 1
        fut: Future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()  # cancels the task on the other loop at its next await
            raise

    async def _tracked(self, coro) -> Any:
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

    async def run(self, coro) -> Any:
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


class ReferenceEngine(Engine):
    """invariant-ai's ``LocalPolicy.a_analyze_pending`` over the last ``max_history`` events."""

    name = "reference"

    def __init__(self, policy: LoadedPolicy, max_history: int = DEFAULT_MAX_HISTORY,
                 offload: bool = True) -> None:
        super().__init__(policy)
        self.local = policy.local
        self.max_history = max_history
        self._thread = LoopPool("reference-engine") if offload else None

    async def analyze(self, past: list[dict], pending: list[dict]):
        """Run invariant-ai itself; raises :class:`EngineError` when the policy raises."""
        try:
            return await self.local.a_analyze_pending(past, pending)
        except Exception as exc:  # noqa: BLE001 - any policy failure fails the batch closed
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    async def check(self, state: SessionState, pending: list[dict[str, Any]],
                    deadline: float | None = None) -> CheckResult:
        past = list(state.log)
        offset = state.log_start
        coro = self.analyze(past, pending)
        result = await within(self._thread.run(coro) if self._thread else coro, deadline)
        matches = [error_to_match(e, offset) for e in result.errors]
        total = offset + len(past) + len(pending)
        return CheckResult(
            matches=matches,
            head={},
            appended=list(pending),
            log_start=max(offset, total - self.max_history),
            pending_len=len(pending),
            engine=self.name,
        )

    def explain(self) -> list[RuleInfo]:
        return [
            RuleInfo(index=i, message=_rule_message(s), engine=self.name,
                     reason="the reference engine was chosen")
            for i, s in enumerate(_rules(self.policy))
        ]

    def close(self) -> None:
        if self._thread:
            self._thread.close()


def _rules(policy: LoadedPolicy) -> list[Any]:
    from invariant.analyzer.language.ast import RaisePolicy

    return [s for s in policy.local.policy_root.statements if isinstance(s, RaisePolicy)]


def _rule_message(rule: Any) -> str:
    try:
        exc = rule.exception_or_constructor
        return str(getattr(exc, "value", exc))
    except AttributeError:
        return str(rule)
