"""The reference engine: invariant-ai's own local evaluator on (past, pending).

Correct by definition but its cost grows with the session (it rebuilds its input on every call),
so the past it sees is bounded by ``max_history`` events, and it runs on a thread of its own so a
slow policy never holds the worker's event loop.
"""

from __future__ import annotations

from typing import Any

from monitor.engine.base import CheckResult, Engine, EngineError, MatchCaps, RuleInfo, SessionState
from monitor.engine.isolation import IsolatedPool
from monitor.engine.support import DEFAULT_MAX_HISTORY, LoopPool, error_to_match, rule_message, within
from monitor.limits import cap_matches
from monitor.policy import LoadedPolicy


class ReferenceEngine(Engine):
    """invariant-ai's ``LocalPolicy.a_analyze_pending`` over the last ``max_history`` events."""

    name = "reference"
    state_is_raw = True

    def __init__(self, policy: LoadedPolicy, max_history: int = DEFAULT_MAX_HISTORY,
                 offload: bool = True, caps: MatchCaps | None = None, pool: IsolatedPool | None = None) -> None:
        super().__init__(policy, caps)
        self.local = policy.local
        self.max_history = max_history
        # a pool of processes: a check past its deadline is killed; else a thread that can only
        # be abandoned (it runs on until it ends)
        self.pool = pool
        if pool is not None:
            pool.register(policy)
        self._thread = LoopPool("reference-engine") if offload and pool is None else None
        self._messages = {i: rule_message(r) for i, r in enumerate(policy.rules)}

    async def analyze(self, past: list[dict[str, Any]], pending: list[dict[str, Any]]) -> Any:
        """Run invariant-ai itself; raises :class:`EngineError` when the policy raises."""
        try:
            return await self.local.a_analyze_pending(past, pending)
        except Exception as exc:  # noqa: BLE001 - any policy failure fails the batch closed
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    async def check(self, state: SessionState, pending: list[dict[str, Any]],
                    deadline: float | None = None) -> CheckResult:
        past = list(state.log)
        offset = state.log_start
        if self.pool is not None:
            errors = await self.pool.analyze(self.policy, None, past, pending, deadline)
        else:
            coro = self.analyze(past, pending)
            errors = (await within(self._thread.run(coro) if self._thread else coro, deadline)).errors
        total = offset + len(past) + len(pending)
        # invariant-ai computes every match (bounded by the deadline): report them as an engine
        # that stops at the caps would
        matches = cap_matches([error_to_match(e, offset) for e in errors], self.caps.rule, self.caps.batch,
                              total, self._messages)
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
            RuleInfo(index=i, message=rule_message(s), engine=self.name,
                     reason="the reference engine was chosen")
            for i, s in enumerate(self.policy.rules)
        ]

    def close(self) -> None:
        if self._thread:
            self._thread.close()
