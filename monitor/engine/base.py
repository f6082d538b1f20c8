"""The engine interface the worker and replay share: ``check(state, pending) -> result``.

An engine is pure with respect to state: it reads a :class:`SessionState` and returns a
:class:`CheckResult` describing the state after the batch; the caller decides whether to keep it
(a denied batch does not join the past by default). State is split in a small ``head`` that is
rewritten per batch and an append-only ``log`` of entries, so a store can persist one record per
entry instead of rewriting a session's history on every event.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from monitor.errors import MonitorError
from monitor.models import Match
from monitor.policy import LoadedPolicy


class SessionState(BaseModel):
    """What an engine keeps between batches of one session (crosses the changelog as JSON)."""

    engine: str = ""
    length: int = Field(default=0, description="events in the session's trace so far")
    head: dict[str, Any] = Field(default_factory=dict)
    log_start: int = Field(default=0, description="number of the first entry still kept")
    log: list[Any] = Field(default_factory=list, description="entries log_start, log_start+1, ...")
    raw: list[Any] | None = Field(default=None, description=(
        "the session's last raw events ({i, e}), loaded by the caller only for an engine whose state "
        "is stale (another policy version wrote it), to rebuild it; never stored with the state"))


class CheckResult(BaseModel):
    """The matches of one batch and the state the session has if the batch is kept."""

    matches: list[Match] = Field(default_factory=list)
    head: dict[str, Any] = Field(default_factory=dict)
    appended: list[Any] = Field(default_factory=list)
    log_start: int = 0
    pending_len: int = 0
    engine: str = ""

    def advance(self, state: SessionState) -> SessionState:
        """The session state once this batch joins the past."""
        log = state.log + self.appended
        drop = max(0, self.log_start - state.log_start)
        return SessionState(
            engine=self.engine,
            length=state.length + self.pending_len,
            head=self.head,
            log_start=max(self.log_start, state.log_start),
            log=log[drop:],
        )


class RuleInfo(BaseModel):
    """How one rule of a policy is evaluated (``agent-monitor policy explain``)."""

    index: int
    message: str
    engine: str
    reason: str = ""


class EngineError(MonitorError):
    """The policy raised while it was evaluated; the batch fails closed."""


class BudgetExceeded(EngineError):
    """The check ran past its deadline and was stopped; the batch fails closed."""


class Deadline:
    """A cooperative deadline: loops call :meth:`check` often, it raises once the time is up.

    Reading the clock costs ~60 ns, so it is read every ``every`` calls only.

    >>> d = Deadline(None)
    >>> d.check()  # no deadline: never raises
    >>> import time
    >>> d = Deadline(time.perf_counter() - 1, every=1)
    >>> d.check()
    Traceback (most recent call last):
    ...
    monitor.engine.base.BudgetExceeded: the check ran past its deadline
    """

    __slots__ = ("at", "every", "_n")

    def __init__(self, at: float | None, every: int = 64) -> None:
        self.at = at
        self.every = every
        self._n = 0

    def check(self) -> None:
        if self.at is None:
            return
        self._n += 1
        if self._n >= self.every:
            self._n = 0
            if time.perf_counter() > self.at:
                raise BudgetExceeded("the check ran past its deadline")

    def left(self) -> float | None:
        """Seconds left (at least 0), or None without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.perf_counter())


@dataclass(frozen=True)
class MatchCaps:
    """How many matches an engine enumerates in one batch: ``rule`` per rule, ``batch`` in all.
    Past a cap, matching stops and one summary match says there are more (a fan-out of N x N
    matches is never computed); the batch is denied all the same."""

    rule: int = 100
    batch: int = 1000


class Engine(ABC):
    """Evaluates one loaded policy batch by batch.

    >>> import asyncio
    >>> from monitor.policy import load_policy_text
    >>> from monitor.engine import make_engine
    >>> eng = make_engine(load_policy_text('raise "hi" if:\\n    (m: Message)\\n    "hi" in m.content\\n'),
    ...                   "reference")
    >>> r = asyncio.run(eng.check(eng.initial_state(), [{"role": "user", "content": "hi"}]))
    >>> [m.addresses for m in r.matches]
    [['messages.0', 'messages.0.content:0-2']]
    """

    name: ClassVar[str]
    # True when the state is the session's raw events themselves (the reference engine's): a new
    # policy version reads it as it is, nothing is kept besides
    state_is_raw: ClassVar[bool] = False

    def __init__(self, policy: LoadedPolicy, caps: MatchCaps | None = None) -> None:
        self.policy = policy
        self.caps = caps or MatchCaps()

    def initial_state(self) -> SessionState:
        return SessionState(engine=self.name)

    def stale(self, state: SessionState) -> bool:
        """Whether ``state`` was written for another policy text and must be rebuilt from the
        session's raw events (``state.raw``) before it is used."""
        return False

    @abstractmethod
    async def check(self, state: SessionState, pending: list[dict[str, Any]],
                    deadline: float | None = None) -> CheckResult:
        """Evaluate ``pending`` after the session's past.

        ``deadline`` (a ``time.perf_counter()`` value) bounds the check: past it the check stops
        and raises :class:`BudgetExceeded`.
        """

    @abstractmethod
    def explain(self) -> list[RuleInfo]:
        """Per rule, which engine evaluates it and why."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads or other resources."""
