"""Session state in a key-value table, laid out so no write rewrites a session's history.

Per session the table holds one small *head* record (per policy: the engine's small state and the
bounds of its log; the ids of recent batches), one record per engine log entry, and one record per
recent verdict. A batch writes its log entries and its verdict first and the head last: the head is
the commit point, so after a crash between the writes the old head is still in charge and the
redelivered batch is evaluated again on the same state, overwriting the same entry keys.

Works on any ``MutableMapping``: the runtime's changelog table in the worker, a dict in replay and tests.

Example::

    >>> from monitor.state import SessionStore
    >>> store = SessionStore({})
    >>> head = store.head("s1")
    >>> store.engine_state(head, "p", "incremental").log
    []
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any, Protocol

from pydantic import BaseModel, Field
from pydantic_core import from_json, to_json

from monitor.engine.base import SessionState
from monitor.errors import MonitorError

_SEP = "\x1f"  # a unit separator cannot be typed into an id by accident; keeps keys unambiguous


class StateCorrupted(MonitorError):
    """The head names a state record that is not in the table; the batch fails closed."""


class StateTooLarge(MonitorError):
    """A batch would leave a session more state than its limits allow (entries per session, bytes
    per state record); the batch is denied and does not join the past, the message says which."""


class PolicyCursor(BaseModel):
    """Where one policy's engine state of a session stands; ``raw_start``-``raw_end``: the trace
    indices of the session's raw events kept (a worker that follows the policy registry keeps the
    last ``--history``, so that a new version can rebuild the state from them)."""

    engine: str = ""
    length: int = 0
    head: dict[str, Any] = Field(default_factory=dict)
    log_start: int = 0
    log_end: int = 0
    raw_start: int = 0
    raw_end: int = 0


class SessionHead(BaseModel):
    """The per-session commit record."""

    policies: dict[str, PolicyCursor] = Field(default_factory=dict)
    recent: list[str] = Field(default_factory=list, description="recent batch ids, oldest first")
    last_seq: int | None = None
    batches: int = 0
    updated_at: float = 0.0


HEAD_PREFIX = f"h{_SEP}"


def _head_record(head: SessionHead) -> dict[str, Any]:
    """``head.model_dump()`` without pydantic's copying: the head dicts an engine writes are never
    changed afterwards, so the record may share them.

    >>> h = SessionHead(policies={"p": PolicyCursor(engine="e", head={"v": 1})}, recent=["b"])
    >>> _head_record(h) == h.model_dump()
    True
    """
    # a model's __dict__ holds its fields, in order (neither model allows extra fields)
    rec = dict(head.__dict__)
    rec["policies"] = {pid: dict(cur.__dict__) for pid, cur in head.policies.items()}
    rec["recent"] = list(head.recent)
    return rec


def head_key(session_id: str) -> str:
    return f"{HEAD_PREFIX}{session_id}"


def entry_key(policy_id: str, session_id: str, n: int) -> str:
    return f"e{_SEP}{session_id}{_SEP}{policy_id}{_SEP}{n}"


def raw_key(policy_id: str, session_id: str, n: int) -> str:
    return f"r{_SEP}{session_id}{_SEP}{policy_id}{_SEP}{n}"


def verdict_key(session_id: str, batch_id: str) -> str:
    return f"v{_SEP}{session_id}{_SEP}{batch_id}"


class VerdictRecords(Protocol):
    """Where a store keeps verdict records: the part of a mapping it uses."""

    def get(self, key: str, /) -> bytes | dict[str, Any] | None: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...

    def pop(self, key: str, default: None, /) -> Any: ...


class SessionStore:
    """Reads and commits session state and recent verdicts in a key-value table."""

    HEAD_CACHE = 100_000  # sessions whose last written head is remembered (then it starts over)

    def __init__(self, table: MutableMapping[str, Any], verdict_memory: int = 64,
                 verdicts: VerdictRecords | None = None) -> None:
        self.table = table
        # where verdict records go: the table itself (the worker: one changelog), or a mapping of
        # their own (replay: kept on disk, as they are read back only for a repeated batch id)
        self.verdicts: VerdictRecords = table if verdicts is None else verdicts
        self.verdict_memory = verdict_memory
        # a table that keeps its values as JSON (the worker's changelog table) hands the head's
        # record over as it is, validated straight into the model
        self._json: Any = getattr(table, "get_json", None)
        # else: the head this store last wrote per session, with the record it wrote: a table
        # that hands back that very record (a dict: replay) needs no validation of it again
        self._heads: dict[str, tuple[Any, SessionHead]] = {}

    def head(self, session_id: str) -> SessionHead:
        if self._json is not None:
            raw_json = self._json(head_key(session_id))
            return SessionHead.model_validate_json(raw_json) if raw_json else SessionHead()
        raw = self.table.get(head_key(session_id))
        if not raw:
            return SessionHead()
        mine = self._heads.get(session_id)
        if mine is not None and mine[0] is raw:
            return mine[1]
        return SessionHead.model_validate(raw)

    def known_verdict(self, head: SessionHead, session_id: str, batch_id: str) -> bytes | dict[str, Any] | None:
        """The verdict this batch already got, if it is among the remembered recent batches: its
        JSON as committed, or (read back from a changelog) the parsed JSON."""
        if batch_id not in head.recent:
            return None
        return self.verdicts.get(verdict_key(session_id, batch_id))

    def engine_state(self, head: SessionHead, policy_id: str, engine: str,
                     session_id: str | None = None) -> SessionState:
        cur = head.policies.get(policy_id)
        if cur is None or (cur.engine and cur.engine != engine):
            # no state yet, or a worker that ran another engine wrote it: start from an empty past
            # but keep counting events so addresses stay right
            return SessionState(engine=engine, length=cur.length if cur else 0)
        assert session_id is not None or cur.log_end == cur.log_start  # noqa: S101 - an internal invariant: a kept log is read with its session id
        log = []
        for n in range(cur.log_start, cur.log_end):
            entry = self.table.get(entry_key(policy_id, session_id or "", n))
            if entry is None:
                raise StateCorrupted(f"entry {n} of session {session_id!r} (policy {policy_id!r}) is "
                                     f"missing from the state table")
            log.append(entry)
        return SessionState(engine=engine, length=cur.length, head=cur.head,
                            log_start=cur.log_start, log=log)

    def raw_events(self, head: SessionHead, policy_id: str, session_id: str) -> list[dict[str, Any]]:
        """The raw events kept for ``policy_id`` in this session, as ``{"i": trace index, "e": event}``
        (read only to rebuild a state another policy version wrote)."""
        cur = head.policies.get(policy_id)
        if cur is None:
            return []
        out = []
        for n in range(cur.raw_start, cur.raw_end):
            event = self.table.get(raw_key(policy_id, session_id, n))
            if event is None:
                raise StateCorrupted(f"raw event {n} of session {session_id!r} (policy {policy_id!r}) is missing "
                                     f"from the state table")
            # (kept as JSON bytes: never read on the live path, and bytes cost the cyclic GC nothing;
            # a changelog restore hands back the parsed event)
            out.append({"i": n, "e": from_json(event) if type(event) is bytes else event})
        return out

    def delete_session(self, session_id: str) -> int:
        """Remove everything a session keeps (head, log entries, recent verdicts); returns the
        number of records removed. The head goes first: a crash part-way leaves unreachable
        records, never a head naming a missing one."""
        raw = self.table.get(head_key(session_id))
        self._heads.pop(session_id, None)
        if raw is None:
            return 0
        head = SessionHead.model_validate(raw)
        self.table.pop(head_key(session_id), None)
        n = 1
        for pid, cur in head.policies.items():
            for i in range(cur.log_start, cur.log_end):
                n += self.table.pop(entry_key(pid, session_id, i), None) is not None
            for i in range(cur.raw_start, cur.raw_end):
                n += self.table.pop(raw_key(pid, session_id, i), None) is not None
        for bid in head.recent:
            n += self.verdicts.pop(verdict_key(session_id, bid), None) is not None
        return n

    def commit(self, session_id: str, head: SessionHead, batch_id: str, verdict: bytes | dict[str, Any],
               seq: int | None = None, policy_id: str | None = None,
               new_state: SessionState | None = None, appended: list[Any] | None = None,
               more: tuple[tuple[str, SessionState, list[Any]], ...] = (),
               forget: tuple[str, ...] = (), raw: list[Any] | None = None, history: int = 0) -> SessionHead:
        """Record a batch's verdict and, when it joins the past, its state; the head goes last.

        ``raw``: the batch's events, kept for ``policy_id`` (the last ``history`` of the session;
        older ones go). ``more`` advances other policy states of the session in the same commit
        (a shadow candidate's: policy id, new state, appended entries); ``forget`` drops policy
        states with all their entries (a candidate that is gone).
        """
        policies = dict(head.policies)
        dropped: list[str] = []
        advances = list(more)
        if policy_id is not None and new_state is not None:
            advances.insert(0, (policy_id, new_state, appended or []))
        for pid, state, entries in advances:
            before = policies.get(pid)
            raw_start, raw_end = (before.raw_start, before.raw_end) if before is not None else (0, 0)
            if before is None or (before.engine and before.engine != state.engine):
                before = PolicyCursor(engine=state.engine, log_start=state.log_start, log_end=state.log_start)
            end = before.log_end
            for entry in entries:
                self.table[entry_key(pid, session_id, end)] = entry
                end += 1
            dropped += [entry_key(pid, session_id, n) for n in range(before.log_start, min(state.log_start, end))]
            if raw is not None and pid == policy_id:
                first = state.length - len(raw)  # the trace index of the batch's first event
                if raw_end != first:  # what was kept does not lead up to this batch: it goes
                    dropped += [raw_key(pid, session_id, n) for n in range(raw_start, raw_end)]
                    raw_start = first
                for k, event in enumerate(raw):
                    self.table[raw_key(pid, session_id, first + k)] = to_json(event)
                raw_end = state.length
                keep_from = max(raw_start, raw_end - history)
                dropped += [raw_key(pid, session_id, n) for n in range(raw_start, keep_from)]
                raw_start = keep_from
            policies[pid] = PolicyCursor(
                engine=state.engine, length=state.length, head=state.head,
                log_start=max(state.log_start, before.log_start), log_end=end, raw_start=raw_start, raw_end=raw_end,
            )
        for pid in forget:
            gone = policies.pop(pid, None)
            if gone is not None:
                dropped += [entry_key(pid, session_id, n) for n in range(gone.log_start, gone.log_end)]
                dropped += [raw_key(pid, session_id, n) for n in range(gone.raw_start, gone.raw_end)]
        self.verdicts[verdict_key(session_id, batch_id)] = verdict
        recent = [b for b in head.recent if b != batch_id] + [batch_id]
        forgotten, recent = recent[: -self.verdict_memory], recent[-self.verdict_memory:]
        new_head = SessionHead(
            policies=policies,
            recent=recent,
            last_seq=seq if head.last_seq is None or (seq is not None and seq > head.last_seq)
            else head.last_seq,
            batches=head.batches + 1,
            updated_at=time.time(),
        )
        record = _head_record(new_head)
        self.table[head_key(session_id)] = record
        if self._json is None:
            if len(self._heads) >= self.HEAD_CACHE:
                self._heads.clear()
            self._heads[session_id] = (record, new_head)
        # deletes only after the head: a crash before them leaves stray records, never a head that
        # names a missing one
        for key in dropped:
            self.table.pop(key, None)
        for old in forgotten:
            self.verdicts.pop(verdict_key(session_id, old), None)
        return new_head
