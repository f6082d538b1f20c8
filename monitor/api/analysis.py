"""Stateless checks for the HTTP API: a whole trace, or pending events given their past.

Both run on the incremental engine, the worker's own, with the worker's time budget:

- ``check(past, pending)``: the past is checked as one batch and its state kept (its matches are
  dropped: they are the past's), then the pending events are checked on that state. Only errors
  binding a pending event are reported, with addresses over past + pending, as invariant-ai's
  ``LocalPolicy.analyze_pending`` reports them. States after a past are cached
  (:class:`PastStates`): a past sent again, or one event longer, is not checked again.
- ``analyze(trace)``: the whole trace as one pending batch. A policy with a rule the engine leaves
  to invariant-ai (quantifiers, ``input.*``, ...), or with policy parameters, runs on invariant-ai's
  ``LocalPolicy.a_analyze`` itself, on a thread and under the same budget, since only that
  reports rules without event variables.

Compiled policies are cached by the sha256 of their text (bounded, least recently used first),
and one text is compiled once even when requests for it arrive together.

Example::

    >>> import asyncio
    >>> from monitor.api.analysis import Analyzer, PolicyCache
    >>> from monitor.config import WorkerSettings
    >>> an = Analyzer(WorkerSettings(policy_path="-"), PolicyCache(8))
    >>> async def run():
    ...     p = await an.cache.compile('raise "hi" if:\\n    (m: Message)\\n    "hi" in m.content\\n')
    ...     out = await an.check(p, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi!"}])
    ...     return [(m.key, m.addresses) for m in out]
    >>> asyncio.run(run())
    [('(0, (1,))', ['messages.1', 'messages.1.content:0-2'])]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from monitor import sandbox
from monitor.api.models import ErrorCode
from monitor.config import WorkerSettings
from monitor.engine import BudgetExceeded, EngineError
from monitor.engine.incremental import IncrementalEngine
from monitor.engine.support import LoopPool, error_to_match, within
from monitor.errors import MonitorError
from monitor.models import Match
from monitor.policy import LoadedPolicy, PolicyLoadError, load_policy_text, sha256_text

# invariant-ai's runtime error kinds, by the catchphrase its RemotePolicy client recognises
CATCHPHRASES: dict[ErrorCode, str] = {
    "missing_parameter": "Missing Policy Parameter: ",
    "excessive_policy": "Excessive Policy: ",
    "attribute_error": "Invariant Attribute Error: ",
    "input_invalid": "Input Validation Error: ",
}
EXECUTION = "Error during analysis: "  # RemotePolicy raises PolicyExecutionError for these


class CheckFailed(MonitorError):
    """A check that could not give errors: the policy raised, or the budget ran out.

    ``code`` is the API error code; ``detail`` keeps invariant's catchphrase where it has one.
    """

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def classify(exc: BaseException, budget_ms: float | None) -> CheckFailed:
    """The API error for a failed check.

    >>> classify(EngineError("rule 0: InvariantAttributeError: Invariant Attribute Error: no x"), 5).code
    'attribute_error'
    >>> classify(BudgetExceeded("late"), 5).detail
    'Error during analysis: the check exceeded its time budget of 5 ms'
    """
    if isinstance(exc, BudgetExceeded):
        return CheckFailed("budget_exceeded", f"{EXECUTION}the check exceeded its time budget of "
                                              f"{budget_ms:g} ms")
    text = str(exc)
    for code, phrase in CATCHPHRASES.items():
        at = text.find(phrase)
        if at >= 0:
            return CheckFailed(code, text[at:])
    return CheckFailed("policy_error", f"{EXECUTION}{text}")


@dataclass
class CompiledPolicy:
    """A parsed policy with its incremental engine."""

    policy: LoadedPolicy
    engine: IncrementalEngine
    # every rule runs on the incremental engine, and none is decided before binding an event
    # (such a rule is reported by invariant's analyze but never for pending events)
    incremental_only: bool = False
    rules: int = 0
    served_as: list[str] = field(default_factory=list)  # ids of the operator's policy, if it is one

    @classmethod
    def of(cls, policy: LoadedPolicy) -> "CompiledPolicy":
        # rules left to invariant-ai run on the engine's own threads, as in the worker
        engine = IncrementalEngine(policy)
        plans = engine.plans
        return cls(policy=policy, engine=engine, rules=len(plans),
                   incremental_only=all(p.compiled is not None and not p.compiled.never for p in plans))

    @property
    def incremental_rules(self) -> int:
        return sum(1 for p in self.engine.plans if p.compiled is not None)


class PolicyCache:
    """Compiled policies by sha256, least recently used dropped past ``size``.

    Parsing and compiling run on a thread (100-200 ms for a small policy): the event loop keeps
    answering meanwhile.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[str, CompiledPolicy] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}
        self._pinned: dict[str, CompiledPolicy] = {}  # the operator's policies, never dropped

    def pin(self, compiled: CompiledPolicy) -> None:
        self._pinned[compiled.policy.sha256] = compiled

    def pinned(self, sha256: str) -> CompiledPolicy | None:
        return self._pinned.get(sha256)

    def __len__(self) -> int:
        return len(self._items)

    async def compile(self, text: str) -> CompiledPolicy:
        """The compiled policy for ``text``; raises :class:`PolicyLoadError` (file:line) if it does
        not parse."""
        sha = sha256_text(text)
        hit = self._pinned.get(sha) or self._items.get(sha)
        if hit is not None:
            if sha in self._items:
                self._items.move_to_end(sha)
            return hit
        waiting = self._pending.get(sha)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[sha] = fut
        try:
            compiled = await asyncio.to_thread(_compile, text, sha)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a failure nobody else awaited is not "never retrieved"
            raise
        finally:
            self._pending.pop(sha, None)
        fut.set_result(compiled)
        self._items[sha] = compiled
        while len(self._items) > self.size:
            _, old = self._items.popitem(last=False)
            old.engine.close()
        return compiled


def _compile(text: str, sha: str) -> CompiledPolicy:
    # cache=False: the parser's own cache is unbounded, this one is not
    policy = load_policy_text(text, f"sha256:{sha[:12]}", cache=False)
    return CompiledPolicy.of(policy)


def _digest(prev: bytes, event: Any) -> bytes:
    data = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(prev + data.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class PastStates:
    """Engine states after a known past, keyed by a hash chain over the events (per policy).

    A client that monitors a session statelessly sends the same past again and again, one event
    longer each time (invariant-server's ``check(past, [event]); past.append(event)`` loop): the
    longest past prefix seen before is not checked again, only what follows it. A state depends
    only on the policy and the events, never on how they were split into batches (the engine's
    differential tests check every split), so reusing one is exact. Bounded by entries and by the
    events the kept states stand for, least recently used dropped first.

    >>> ps = PastStates(entries=2)
    >>> keys = ps.chain(b"p", [{"a": 1}, {"b": 2}])
    >>> ps.put(keys[1], "after-a", 1); ps.longest(keys)
    (1, 'after-a')
    """

    def __init__(self, entries: int = 4096, max_events: int = 200_000) -> None:
        self.entries = entries
        self.max_events = max_events
        self._items: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._events = 0
        self.hits = 0

    @staticmethod
    def chain(seed: bytes, events: list[Any], start: bytes | None = None) -> list[bytes]:
        """Keys after 0, 1, ... len(events) events (from ``start``, else the policy's seed)."""
        keys = [start if start is not None else hashlib.blake2b(seed, digest_size=16).digest()]
        for event in events:
            keys.append(_digest(keys[-1], event))
        return keys

    def longest(self, keys: list[bytes]) -> tuple[int, Any]:
        """(events covered, state) of the longest cached prefix; (0, None) when none is."""
        for n in range(len(keys) - 1, 0, -1):
            hit = self._items.get(keys[n])
            if hit is not None:
                self._items.move_to_end(keys[n])
                self.hits += 1
                return n, hit[0]
        return 0, None

    def put(self, key: bytes, state: Any, length: int) -> None:
        if length > self.max_events:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._events -= old[1]
        self._items[key] = (state, length)
        self._events += length
        while self._items and (len(self._items) > self.entries or self._events > self.max_events):
            _, (_, n) = self._items.popitem(last=False)
            self._events -= n

    def __len__(self) -> int:
        return len(self._items)


class Analyzer:
    """Runs stateless checks with a worker's budget and caps (see the module docstring)."""

    def __init__(self, settings: WorkerSettings, cache: PolicyCache | None = None,
                 past_states: PastStates | None = None) -> None:
        self.settings = settings
        self.cache = cache if cache is not None else PolicyCache()
        self.past_states = past_states if past_states is not None else PastStates()
        self._pool = LoopPool("api-reference")

    def _deadline(self) -> float | None:
        budget = self.settings.budget_ms
        return None if budget is None else time.perf_counter() + budget / 1000.0

    async def check(self, compiled: CompiledPolicy, past: list[dict[str, Any]],
                    pending: list[dict[str, Any]]) -> list[Match]:
        """Matches of ``pending`` given ``past``; raises :class:`CheckFailed`."""
        engine = compiled.engine
        deadline = self._deadline()
        seed = compiled.policy.sha256.encode()
        keys = self.past_states.chain(seed, past)
        done, state = self.past_states.longest(keys)
        try:
            if state is None:
                state = engine.initial_state()
            with sandbox.guarded():  # policy code runs: no network, process or file write
                if done < len(past):
                    # the past's own matches are the past's: only its state is kept
                    state = (await engine.check(state, past[done:], deadline=deadline)).advance(state)
                    self.past_states.put(keys[-1], state, len(past))
                result = await engine.check(state, pending, deadline=deadline)
        except (EngineError, BudgetExceeded) as exc:
            raise classify(exc, self.settings.budget_ms) from None
        # the next request of a monitoring loop sends this past plus these pending events
        after = self.past_states.chain(seed, pending, start=keys[-1])[-1]
        self.past_states.put(after, result.advance(state), len(past) + len(pending))
        return result.matches

    async def analyze(self, compiled: CompiledPolicy, trace: list[dict[str, Any]],
                      parameters: dict[str, Any] | None = None) -> list[Match]:
        """Matches of the whole ``trace`` (as invariant-ai's ``LocalPolicy.analyze``); raises
        :class:`CheckFailed`."""
        if compiled.incremental_only and not parameters:
            return await self.check(compiled, [], trace)
        local = compiled.policy.local
        params = dict(parameters or {})

        async def run():
            return await local.a_analyze(trace, **params)

        try:
            with sandbox.guarded():
                result = await within(self._pool.run(run()), self._deadline())
        except BudgetExceeded as exc:
            raise classify(exc, self.settings.budget_ms) from None
        except Exception as exc:  # noqa: BLE001 - the policy's failure is the client's answer
            raise classify(EngineError(f"{type(exc).__name__}: {exc}"), self.settings.budget_ms) from None
        return [error_to_match(e, 0) for e in result.errors]

    def close(self) -> None:
        self._pool.close()


__all__ = ["Analyzer", "CheckFailed", "CompiledPolicy", "PolicyCache", "PolicyLoadError", "classify"]
