"""Checks that can really be stopped: invariant-ai in worker processes, killed at their deadline.

A thread cannot be stopped in Python: a check abandoned at its time budget keeps its thread and
the CPU until it ends by itself, and meanwhile every other session's checks are slowed down and
overrun their budgets too (an attacker's one batch denies everyone). Here each check of the
reference engine, and of the rules the incremental engine leaves to invariant-ai, runs in one of
a few worker processes; one that is still running at its deadline is killed (SIGKILL: its CPU
and memory are freed at once) and replaced, and the check fails with :class:`BudgetExceeded`.

Children are forked from multiprocessing's fork server, which imports invariant-ai and parses
the registered policies once (:data:`PRELOAD_ENV`), so a replacement is ready in milliseconds.
A child is only given a check once it has acknowledged loading every registered policy.

Policy code is as confined in a child as in the worker (:mod:`monitor.sandbox`): a child takes
the worker's allowed imports, installs the audit hook and parses and checks inside
:func:`monitor.sandbox.guarded`, which a context variable carries and a process does not inherit.

Example::

    >>> import asyncio, time
    >>> from monitor.policy import load_policy_text
    >>> p = load_policy_text('raise "hi" if:\\n    (m: Message)\\n    "hi" in m.content\\n')
    >>> pool = IsolatedPool(1)
    >>> pool.register(p)
    >>> pool.start()
    >>> errors = asyncio.run(pool.analyze(p, None, [], [{"role": "user", "content": "hi"}], None))
    >>> [(e.key, e.args) for e in errors]
    [('(0, (0,))', ['hi'])]
    >>> pool.close()
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from monitor import sandbox
from monitor.engine.base import BudgetExceeded, EngineError
from monitor.engine.support import error_kwargs, error_message  # (and its warning filter)
from monitor.errors import MonitorError
from monitor.policy import LoadedPolicy

log = logging.getLogger("agent_monitor.engine.isolation")

PRELOAD_ENV = "AGENT_MONITOR_ENGINE_PRELOAD"
"""The registered policies and allowed imports, as JSON, for the fork server to parse once before
it forks children."""

# errors a child sends back per rule (the caller caps them further): what a fan-out may cost
# to carry, whatever invariant-ai computed before it was stopped
MAX_ERRORS_PER_RULE = 10_000
MAX_FAILED_STARTS = 5


class PoolClosed(MonitorError):
    """The pool was closed while a check waited for a process."""


PolicySpec = tuple[str, str, str, tuple[str, ...], tuple[int, ...] | None]  # sha, text, id, sources, rules


def _spec(policy: LoadedPolicy, rules: list[int] | None) -> PolicySpec:
    return (policy.sha256, policy.text, policy.policy_id, tuple(policy.sources),
            None if rules is None else tuple(rules))


# -- the child ------------------------------------------------------------------------------------

_LOADED: dict[tuple[str, tuple[int, ...] | None], Any] = {}


def _load(spec: PolicySpec) -> Any:
    """invariant-ai's LocalPolicy for ``spec`` (only the rules named, when it names some)."""
    sha, text, pid, sources, rules = spec
    key = (sha, rules)
    if key not in _LOADED:
        local = LoadedPolicy(text=text, policy_id=pid, sha256=sha, sources=list(sources)).local
        if rules is not None:
            from invariant.analyzer.runtime.rule import RuleSet

            sub = copy.copy(local)
            sub.rule_set = RuleSet([local.rule_set.rules[i] for i in rules],
                                   symbol_table=local.rule_set.symbol_table, cached=False)
            sub.cached = False
            local = sub
        _LOADED[key] = local
    return _LOADED[key]


def _preload() -> None:
    """In the fork server: import invariant-ai and parse the registered policies once, for every
    child it forks."""
    import invariant.analyzer.policy  # noqa: F401 - the slow import, done once

    raw = os.environ.get(PRELOAD_ENV)
    if not raw:
        return
    try:
        preload = json.loads(raw)
        _confine(preload["allowed_imports"])
        for spec in preload["specs"]:
            _load((spec[0], spec[1], spec[2], tuple(spec[3]), None if spec[4] is None else tuple(spec[4])))
    except Exception:  # noqa: BLE001, S110 - a child loads what is missing itself, and reports it
        pass


def _confine(allowed_imports: list[str]) -> None:
    """The sandbox as the worker has it (the allowed imports decide what a policy may parse)."""
    sandbox.set_allowed_imports(allowed_imports)
    sandbox.install_guard()


def _error_record(err: Any) -> tuple[str, list[str], dict[str, Any], list[str]]:
    return (str(err.key), [error_message(err)], error_kwargs(err), [r.json_path for r in err.ranges])


def _child(conn: Any) -> None:
    """A child's loop: ``load`` (acknowledged once every policy is parsed) and ``check``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops us; Ctrl-C is its to handle
    loop = asyncio.new_event_loop()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        kind = request[0]
        try:
            if kind == "load":
                _confine(request[2])
                with sandbox.guarded():  # (parsing links the policy's imports: policy code)
                    for spec in request[1]:
                        _load(spec)
                conn.send(("ready", None))
                continue
            _, spec, past, pending = request
            refused = sandbox.refused_count()
            with sandbox.guarded():  # no network, process or file write while policy code runs
                local = _load(spec)
                result = loop.run_until_complete(local.a_analyze_pending(past, pending))
            per_rule: dict[str, int] = {}
            out = []
            for err in result.errors:
                rule = str(err.key).split(",", 1)[0]
                per_rule[rule] = per_rule.get(rule, 0) + 1
                if per_rule[rule] <= MAX_ERRORS_PER_RULE:
                    out.append(_error_record(err))
            conn.send(("ok", out, sandbox.refused_count() - refused))
        except Exception as exc:  # noqa: BLE001 - any policy failure fails the batch closed
            conn.send(("error", f"{type(exc).__name__}: {exc}", sandbox.refused_count() - refused))


# -- the parent -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    process: Any
    conn: Any
    ready: bool = False
    busy: bool = False


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    # invariant-ai and the policies are loaded once in the fork server, not in every child
    ctx.set_forkserver_preload(["monitor.engine.isolation_preload"])
    return ctx


class IsolatedPool:
    """``size`` worker processes running invariant-ai; see the module docstring.

    :meth:`register` every policy before :meth:`start`; a policy registered later is parsed by
    each child when it is first checked.
    """

    def __init__(self, size: int = 2, allowed_imports: tuple[str, ...] | list[str] = ()) -> None:
        self.size = max(1, size)
        self.allowed_imports = list(allowed_imports)
        self.specs: dict[tuple[str, tuple[int, ...] | None], PolicySpec] = {}
        self.slots: list[_Slot] = []
        self.kills = 0  # children killed at a deadline (for tests and logs)
        self._failed_starts = 0  # children in a row that failed before they were ready
        self._closed = False

    def register(self, policy: LoadedPolicy, rules: list[int] | None = None) -> None:
        """A policy (or only its rules ``rules``) the children are to load. Once the pool runs
        (a new policy version installed between batches), idle children load it at once, so the
        first check of it does not spend its budget parsing."""
        spec = _spec(policy, rules)
        if (spec[0], spec[4]) in self.specs:
            return
        self.specs[(spec[0], spec[4])] = spec
        for slot in self.slots:
            if slot.ready and not slot.busy:
                slot.ready = False  # ready again once it acknowledges the load
                slot.conn.send(("load", [spec], self.allowed_imports))

    def start(self) -> None:
        """Start the children (at once: a first check must not wait for them)."""
        if self.slots or self._closed:
            return
        os.environ[PRELOAD_ENV] = json.dumps({"specs": [list(s) for s in self.specs.values()],
                                              "allowed_imports": self.allowed_imports})
        for _ in range(self.size):
            self.slots.append(self._spawn())

    def _spawn(self) -> _Slot:
        ctx = _context()
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_child, args=(child,), name="agent-monitor-engine", daemon=True)
        # a child runs _child from this module and needs nothing of __main__: without this,
        # multiprocessing would run the main script again in it (a script without a
        # `__main__` guard would start a pool of its own there)
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            with sandbox.trusted():  # (a replacement may start while a check is guarded)
                process.start()
        finally:
            sys.modules["__main__"] = main
        child.close()
        try:
            parent.send(("load", list(self.specs.values()), self.allowed_imports))
        except OSError:
            pass  # it died at once: _take reads its end and counts a failed start
        return _Slot(process, parent)

    async def _take(self, deadline: float | None) -> _Slot:
        """A ready, idle child; waiting for one (all busy, or still loading) counts against the
        deadline. (The worker checks one batch at a time: waiting is rare, so it polls.)"""
        if not self.slots:
            self.start()
        while True:
            if self._closed:
                raise PoolClosed("the engine's process pool was closed")
            for slot in list(self.slots):
                if not slot.busy and not slot.ready and slot.conn.poll():
                    self._receive_ready(slot)
                if slot.ready and not slot.busy:
                    slot.busy = True
                    return slot
            if deadline is not None and time.perf_counter() >= deadline:
                raise BudgetExceeded("the check ran past its deadline (waiting for an engine process)")
            await asyncio.sleep(0.002)

    def _receive_ready(self, slot: _Slot) -> None:
        try:
            kind, detail = slot.conn.recv()[:2]
        except (EOFError, OSError):
            kind, detail = "error", f"exit code {slot.process.exitcode}"
        if kind == "ready":
            slot.ready, self._failed_starts = True, 0
            return
        self._failed_starts += 1
        if self._failed_starts > MAX_FAILED_STARTS:  # no restart storm: the checks fail closed
            raise EngineError(f"the engine processes cannot start ({detail})")
        self._replace(slot, f"failed while loading the policies ({detail})")

    def _replace(self, slot: _Slot, why: str) -> None:
        """Kill ``slot``'s child (if it still runs) and start another in its place."""
        log.warning("engine process %s %s: replacing it", slot.process.pid, why)
        with sandbox.trusted():  # (called while a check is guarded: the kill is the worker's own)
            try:
                slot.process.kill()
                slot.process.join(5)
            except Exception:  # noqa: BLE001, S110 - it is gone either way
                pass
            slot.conn.close()
            if self._closed:
                return
            i = self.slots.index(slot)
            self.slots[i] = self._spawn()

    async def analyze(self, policy: LoadedPolicy, rules: list[int] | None, past: list[dict[str, Any]],
                      pending: list[dict[str, Any]], deadline: float | None) -> list[Any]:
        """invariant-ai's ``analyze_pending(past, pending)`` for ``policy`` (or its rules
        ``rules``) in a child: its errors (objects with ``key``, ``args``, ``kwargs`` and
        ``ranges`` as invariant-ai's have), at most :data:`MAX_ERRORS_PER_RULE` per rule.

        Raises :class:`BudgetExceeded` at ``deadline`` (the child is killed) and
        :class:`EngineError` when the policy raises.
        """
        spec = _spec(policy, rules)
        if (spec[0], spec[4]) not in self.specs:
            self.specs[(spec[0], spec[4])] = spec  # children load it on first use
        slot = await self._take(deadline)
        loop = asyncio.get_running_loop()
        fd = slot.conn.fileno()
        try:
            slot.conn.send(("check", spec, past, pending))
            answered = loop.create_future()

            def wake() -> None:
                if not answered.done():
                    answered.set_result(None)

            loop.add_reader(fd, wake)
            try:
                left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                await asyncio.wait_for(answered, left)
            except asyncio.TimeoutError:
                self.kills += 1
                self._replace(slot, "overran its deadline")
                raise BudgetExceeded("the check ran past its deadline (its process was stopped)") from None
            finally:
                loop.remove_reader(fd)
            try:
                kind, value, refused = slot.conn.recv()
                sandbox.count_refused(refused)  # the worker's count (and metric) includes its children's
            except (EOFError, OSError):
                self._replace(slot, "exited during a check")
                raise EngineError("the policy check's process exited (out of memory?)") from None
        except BaseException:
            if slot in self.slots and slot.conn.closed is False and slot.busy:
                # cancelled mid-check: its answer would be read by the next check
                self._replace(slot, "was abandoned mid-check")
            raise
        finally:
            slot.busy = False
        if kind == "error":
            raise EngineError(value)
        return [SimpleNamespace(key=key, args=args, kwargs=kwargs,
                                ranges=[SimpleNamespace(json_path=p) for p in paths])
                for key, args, kwargs, paths in value]

    def close(self) -> None:
        """Stop every child."""
        self._closed = True
        for slot in self.slots:
            try:
                slot.conn.close()
                slot.process.kill()
                slot.process.join(5)
            except Exception:  # noqa: BLE001, S110 - closing anyway
                pass
        self.slots = []
