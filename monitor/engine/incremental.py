"""The incremental engine: per-batch work proportional to the batch and the candidates still alive.

Each compiled rule (see :mod:`monitor.engine.compiler`) is matched like a small CEP automaton:

- every pending event (and every tool call nested in a pending message) is tried once per rule
  variable of its type; the variable's own conditions are evaluated there and then, by
  invariant-ai's interpreter (detector results included), and the outcome is kept as a
  *candidate*: trace index, flow position, the ranges its conditions marked, and the event itself
  only when a condition joining several variables or the raise expression will need it;
- assignments binding at least one pending element are enumerated from the kept candidates and
  the new ones, pruned by the flow constraints (``a -> b``: a comes earlier in invariant's flow
  order; ``a ~> b``: a directly precedes b), and only then are join conditions evaluated;
- the session state keeps only what a rule can still need: nothing for a variable every other
  variable must precede, the last few positions for a ``~>`` source, all candidates otherwise.

Rules that do not compile run on invariant-ai itself over a bounded window of raw events kept in
the same log (entries are tagged: ``"c"`` candidate, ``"e"`` raw event).

Where it can differ from invariant-ai (all rare, and what the differential tests exclude):

- ranges where invariant's own are wrong: once a rule body calls a function, invariant gives every
  error the ranges of all matches (a shared interpreter stack); here each match has its own;
- invariant locates a marked object by identity anywhere in the trace, so a one-character or
  empty string (a CPython singleton) is also reported where the same string sits in other
  events; here only the bound events are searched;
- errors: invariant aborts an analysis when any assignment reaches a condition that raises; the
  state keeps, per failing condition, the earliest event that failed it, which covers the usual
  shapes but not every combination of three or more variables;
- a state written for another policy text is not reused (its candidates name other rules): it
  is rebuilt from the session's raw events the caller hands over (``SessionState.raw``, kept by a
  worker that follows the policy registry), or from those the log kept for uncompiled rules, or
  starts afresh without any.

Example::

    >>> import asyncio
    >>> from monitor.policy import load_policy_text
    >>> from monitor.engine.incremental import IncrementalEngine
    >>> eng = IncrementalEngine(load_policy_text(
    ...     'raise "no" if:\\n    (m: Message) -> (t: ToolCall)\\n    "send" in m.content\\n'
    ...     '    t is tool:send_email\\n'))
    >>> s = eng.initial_state()
    >>> r = asyncio.run(eng.check(s, [{"role": "user", "content": "send it"}]))
    >>> r.matches, len(r.appended)
    ([], 1)
    >>> s = r.advance(s)
    >>> r = asyncio.run(eng.check(s, [{"type": "function", "id": "1",
    ...     "function": {"name": "send_email", "arguments": {}}}]))
    >>> [(m.key, m.addresses) for m in r.matches]
    [('(0, (0, 1))', ['messages.0', 'messages.0.content:0-4', 'messages.1'])]
"""

from __future__ import annotations

import ast as pyast
import copy
from typing import Any, cast

from invariant.analyzer.runtime.evaluation import NOP

from monitor.engine.base import (
    BudgetExceeded,
    CheckResult,
    Deadline,
    Engine,
    EngineError,
    MatchCaps,
    RuleInfo,
    SessionState,
)
from monitor.engine.compiler import ARROW, DECL, JOIN, OWN, CompiledRule, Cond, RulePlan, compile_policy
from monitor.engine.conditions import (
    FALSE,
    OTHER,
    RAISE,
    DirectContext,
    Element,
    EventIndex,
    ToolOutput,
    call_record,
    evaluate,
    evaluate_fast,
    evaluate_value,
    link_outputs,
    object_place,
    parse_batch,
    parse_flat,
    prepared_events,
    rebuild_call,
)
from monitor.engine.isolation import IsolatedPool
from monitor.engine.support import DEFAULT_MAX_HISTORY, LoopPool, error_kwargs, error_message, error_to_match, within
from monitor.errors import MonitorError
from monitor.limits import MAX_ADDRESSES, cap_matches, summary_match
from monitor.models import Match
from monitor.policy import LoadedPolicy

STATE_VERSION = 1


class _Cand:
    """A candidate during one check: its stored record plus, while in memory, its element."""

    __slots__ = ("rec", "el", "new")

    def __init__(self, rec: dict[str, Any], el: Element | None, new: bool) -> None:
        self.rec = rec
        self.el = el
        self.new = new


def _failed_record(pos: int, el: Element, rg: list[Any]) -> dict[str, Any]:
    """The record of an element whose own condition at ``pos`` is false."""
    return {"i": el.trace_idx, "j": el.call_idx, "f": el.flat, "rg": rg, "st": pos, "k": FALSE}


def _record_of(rec: dict[str, Any] | int, el: Element) -> dict[str, Any]:
    """A failed element's record, made from its failing position if that is all it kept."""
    return _failed_record(rec, el, []) if isinstance(rec, int) else rec


def _record_outcome(rec: dict[str, Any], cond: Any, out: Any) -> bool:
    """Add one own condition's outcome to a candidate record; True when the body stops there."""
    if out.status in (FALSE, RAISE):
        rec["st"], rec["k"] = cond.pos, out.status
        if out.error:
            rec["err"] = out.error
        return True
    if out.status == OTHER:
        rec["x"] = 1
    if out.marks:
        rec["rg"].extend([i, s, cond.pos, k, p] for k, (i, s, p) in enumerate(out.marks))
    for n, (name, part, places) in enumerate(out.leaks):
        rec.setdefault("lk", []).append([cond.pos, n, name, part, places])
    return False


class _Enough(MonitorError):
    """A rule found one match past its room: enumeration stops (internal)."""


def _bounded_vars(rule: CompiledRule) -> set[int]:
    """Variables whose later candidates are dominated by earlier ones: kept without limit today,
    read only by ``a -> b`` flow from them (not joined, not in the raise expression, never a flow
    target, never ``~>``). An earlier candidate satisfies every constraint a later one does, so
    once ``caps.rule + 1`` plain candidates are kept, a later one can add no match the rule's cap
    would still list, nor an error the earlier ones would not reach first (see
    :func:`_dominated_dropped`): without this, "send" in every user message made the state, and
    the time of every check, grow with the session."""
    targets = {c.vars[1] for c in rule.conds if c.kind == ARROW}
    direct = {c.vars[0] for c in rule.conds if c.kind == ARROW and c.direct}
    joined = {v for c in rule.conds if c.kind == JOIN for v in c.vars}
    return {v for v, keep in enumerate(rule.keep)
            if keep is None and v not in targets | direct | joined | rule.needs_object}


def _dominated_dropped(kept: list[dict[str, Any]], recs: list[dict[str, Any]], plain_cap: int) -> list[dict[str, Any]]:
    """``recs`` (new records of a bounded variable, in flow order) without those that come after
    ``plain_cap`` plain candidates (kept ones included): a plain candidate passed every own
    condition. Witnesses and candidates whose own condition raised are always kept."""
    plain = sum(1 for r in kept if "k" not in r and "x" not in r)
    out = []
    for r in recs:
        if "k" in r:  # FALSE witness or RAISE: bounded by the conditions and the session limit
            out.append(r)
        elif plain < plain_cap:
            plain += "x" not in r
            out.append(r)
    return out


class IncrementalEngine(Engine):
    """Compiled rules matched incrementally; rules that do not compile run on invariant-ai over the
    last ``max_history`` events. Verdicts, messages, keys and addresses equal the reference's."""

    name = "incremental"

    def __init__(self, policy: LoadedPolicy, max_history: int = DEFAULT_MAX_HISTORY,
                 offload: bool = True, caps: MatchCaps | None = None, pool: IsolatedPool | None = None) -> None:
        super().__init__(policy, caps)
        self.local = policy.local
        self.max_history = max_history
        self.plans: list[RulePlan] = compile_policy(policy)
        self.compiled: list[CompiledRule] = [p.compiled for p in self.plans if p.compiled]
        self.fallback: list[int] = [p.index for p in self.plans if p.compiled is None]
        self._ctx = DirectContext(self.local.rule_set.symbol_table)
        self._tag = policy.sha256[:16]  # ties a state's candidates to this policy text
        self._links = any(r.links_outputs for r in self.compiled)
        self._needs_raw = any(r.needs_object for r in self.compiled)
        # no variable binds a tool output, or reaches one through a call: their objects are never
        # read, so they are not built (a third of a typical agent's events)
        self._skip_outputs = not self._links and all(
            var.type in ("Message", "ToolCall") for r in self.compiled for var in r.vars)
        # per rule and variable: its own conditions, in body order
        self._own = {r.index: [r.own_conds(v) for v in range(len(r.vars))] for r in self.compiled}
        # per rule: the variables whose candidates past the first caps.rule + 1 can be dropped
        self._bounded = {r.index: _bounded_vars(r) for r in self.compiled}
        self._sub: Any = None  # invariant-ai's LocalPolicy for the fallback rules
        self._thread = None
        self.pool = pool
        if self.fallback and pool is not None:
            pool.register(policy, self.fallback)  # run where a check past its deadline is stopped
        elif self.fallback:
            from invariant.analyzer.runtime.rule import RuleSet

            sub = copy.copy(self.local)
            sub.rule_set = RuleSet([self.local.rule_set.rules[i] for i in self.fallback],
                                   symbol_table=self.local.rule_set.symbol_table, cached=False)
            sub.cached = False
            self._sub = sub
            self._thread = LoopPool("incremental-fallback") if offload else None

    # -- public API ------------------------------------------------------------------------

    def explain(self) -> list[RuleInfo]:
        """Per rule: ``incremental`` with what its state keeps, or ``reference`` and why.

        >>> from monitor.policy import load_policy_text
        >>> eng = IncrementalEngine(load_policy_text('from invariant import count\\n'
        ...     'raise "x" if:\\n    (m: Message)\\n    count(min=2):\\n        (t: ToolCall)\\n'))
        >>> [(i.engine, i.reason.split(" (")[0]) for i in eng.explain()]
        [('reference', 'a quantifier')]
        """
        out = []
        for p in self.plans:
            if p.compiled is not None:
                out.append(RuleInfo(index=p.index, message=p.message, engine="incremental",
                                    reason=p.reason))
            else:
                out.append(RuleInfo(
                    index=p.index, message=p.message, engine="reference",
                    reason=f"{p.reason}; runs on invariant-ai over the last {self.max_history} events"))
        return out

    async def check(self, state: SessionState, pending: list[dict[str, Any]],
                    deadline: float | None = None, *, _rebuild: bool = False) -> CheckResult:
        """Evaluate ``pending`` after the session's past (see the module docstring).

        The check runs inline; ``deadline`` is checked between elements and assignments, so an
        overrun stops within one condition's evaluation of it.

        A state written by another version of the policy (see :meth:`stale`) is rebuilt first
        from the session's raw events: ``state.raw`` when the caller loaded them, else those the
        log kept for uncompiled rules. This version's own conditions run over them, no match is
        reported for them (they were answered already), and a flow that began before the update
        is caught when it completes. Without raw events the past starts afresh. The rebuild
        counts against ``deadline``.
        """
        head, log = state.head, state.log
        if head.get("v") != STATE_VERSION or head.get("p") != self._tag:
            if head and not _rebuild:
                return await self._check_stale(state, pending, deadline)
            head, log = self._fresh_head(), []  # a session's first batch (or a rebuild's start)
        budget = Deadline(deadline, every=16)  # a join condition may take milliseconds
        length = state.length
        # tool outputs made explicit once: parsing, kept events and call records all read them
        prepared, last_call = prepared_events(pending, head.get("lc"))
        try:
            parsed, elements, flat_end = parse_flat(prepared, length, head["flat"], self._skip_outputs)
        except Exception as exc:  # noqa: BLE001 - the reference fails the same way
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        index = EventIndex()
        by_kind: dict[str, list[Element]] = {}
        for el in elements:
            if el.call_idx < 0:  # (a nested call's event is its message, added already)
                index.add(el.event, el.trace_idx)
            group = by_kind.get(el.kind)
            if group is None:
                by_kind[el.kind] = [el]
            else:
                group.append(el)
        raw_prepared = prepared if self._needs_raw else None

        # what the log holds, by rule and variable (candidates) and raw events for fallback rules
        old: dict[tuple[int, int], list[dict[str, Any]]] = {}
        raw_entries: list[tuple[int, dict[str, Any]]] = []
        past_calls: dict[str, dict[str, Any]] = {}
        for pos, entry in enumerate(log):
            t = entry.get("t")
            if t == "c":
                old.setdefault((entry["r"], entry["v"]), []).append(entry)
            elif t == "e":
                raw_entries.append((pos, entry))
            elif t == "k":
                past_calls[entry["id"]] = entry  # the latest call with an id wins, as in invariant
        links: dict[int, dict[str, Any]] = {}
        if self._links:
            links = link_outputs(parsed, prepared, past_calls, index)

        matches: list[Match] = []
        appended: list[dict[str, Any]] = []
        new_tail: dict[str, dict[str, list[dict[str, Any]]]] = {}
        objects: dict[int, Any] = {}  # kept events re-read this check, one object per trace index

        caps, end = self.caps, length + len(pending)
        for rule in self.compiled:
            if rule.never:
                continue
            # a rule stops at its cap, or at what is left of the batch's: one summary says more
            room = max(0, min(caps.rule, caps.batch - len(matches)))
            rule_matches, new_recs, new_witnesses, more = await self._match_rule(
                rule, by_kind, raw_prepared, old, head, index, objects, links, budget, room, _rebuild)
            matches.extend(rule_matches)
            if more:
                why = "--max-rule-matches" if room == caps.rule else "--max-batch-matches"
                matches.append(summary_match(rule.index, rule.message, len(rule_matches), end, why))
            tails = head["tail"].get(str(rule.index), {})
            bounded = self._bounded[rule.index]
            for v, keep in enumerate(rule.keep):
                if keep is None:
                    recs = sorted(new_recs[v] + new_witnesses[v], key=lambda r: r["f"])
                    if recs and v in bounded:
                        recs = _dominated_dropped(old.get((rule.index, v), []), recs, caps.rule + 1)
                    for rec in recs:
                        appended.append({"t": "c", "r": rule.index, "v": v, **rec})
                elif keep > 0:
                    kept = [r for r in tails.get(str(v), []) + new_recs[v] + new_witnesses[v]
                            if r["f"] >= flat_end - keep]
                    if kept:
                        new_tail.setdefault(str(rule.index), {})[str(v)] = kept

        if self._links:
            # tool calls a later output may name (its conditions see the linked call)
            for el in elements:
                if el.kind == "ToolCall":
                    call = call_record(prepared[el.raw_pos], el.trace_idx, el.call_idx)
                    if call is not None:
                        appended.append({"t": "k", **call})
        log_start = state.log_start + (len(state.log) - len(log))
        if self.fallback:
            if not _rebuild:  # (a rebuild reports no match: the fallback rules have nothing to add)
                found = await self._run_fallback(raw_entries, length, pending, deadline)
                # invariant-ai computed these (within the deadline): capped as if it had stopped
                matches.extend(cap_matches(found, caps.rule, max(0, caps.batch - len(matches)), end,
                                           {p.index: p.message for p in self.plans}))
            appended.extend({"t": "e", "i": length + k, "e": e} for k, e in enumerate(pending))
            # drop raw events that left the window, keeping the candidates that sat among them
            total = length + len(pending)
            stale = [(pos, e) for pos, e in raw_entries if e["i"] < total - self.max_history]
            if len(stale) > max(self.max_history, 64):
                cut = stale[-1][0] + 1
                latest = {id(e) for e in past_calls.values()}
                carried = [e for e in log[:cut]
                           if e.get("t") == "c" or (e.get("t") == "k" and id(e) in latest)]
                appended = carried + appended
                log_start = state.log_start + cut

        new_head = {"v": STATE_VERSION, "p": self._tag, "flat": flat_end, "lc": last_call,
                    "tail": new_tail}
        return CheckResult(matches=matches, head=new_head, appended=appended, log_start=log_start,
                           pending_len=len(pending), engine=self.name)

    async def _check_stale(self, state: SessionState, pending: list[dict[str, Any]],
                           deadline: float | None) -> CheckResult:
        """:meth:`check` on a state another version wrote: rebuilt from raw events first."""
        raw = state.raw if state.raw else [e for e in state.log if e.get("t") == "e"]
        raw = sorted(raw, key=lambda e: e["i"])
        # every entry of the old state goes; numbering goes on after them
        fresh = SessionState(engine=self.name, length=raw[0]["i"] if raw else state.length,
                             head=self._fresh_head(), log_start=state.log_start + len(state.log))
        if raw:
            rebuilt = (await self.check(fresh, [e["e"] for e in raw], deadline, _rebuild=True)).advance(fresh)
        else:
            rebuilt = fresh
        rebuilt.length = state.length  # events the window no longer held still count in addresses
        result = await self.check(rebuilt, pending, deadline)
        # relative to the caller's state: the old entries all go, the rebuilt ones come first
        return result.model_copy(update={"appended": rebuilt.log + result.appended})

    def stale(self, state: SessionState) -> bool:
        """Whether ``state`` was written by another policy text (or state layout): its candidates
        name other rules, so :meth:`check` rebuilds it from raw events."""
        head = state.head
        return bool(head) and (head.get("v") != STATE_VERSION or head.get("p") != self._tag)

    def close(self) -> None:
        if self._thread:
            self._thread.close()

    # -- internals -------------------------------------------------------------------------

    def _fresh_head(self) -> dict[str, Any]:
        return {"v": STATE_VERSION, "p": self._tag, "flat": 0, "lc": None, "tail": {}}

    def _own_record_fast(self, conds: list[Cond], decl: Any, el: Element,
                         index: EventIndex) -> dict[str, Any] | int | None:
        """The own part of :meth:`_own_record` when plain Python decides every condition (no
        coroutine): :func:`evaluate_fast` and :func:`_record_outcome` folded into one loop, as
        this runs for every (variable, element) pair. None when one needs the interpreter; the
        position of the failing condition when that is all the record would hold (the
        commonest outcome by far: see :func:`_failed_record`)."""
        store = {decl: el.obj}
        rg: list[Any] | None = None
        other = False
        for cond in conds:
            fast = cond.fast
            if fast is None:
                return None
            spans: list[tuple[Any, int, int]] = []
            try:
                value = fast(store, spans)
            except Exception:  # noqa: BLE001 - _Slow, or an error the interpreter words itself
                return None
            if value is False:
                if rg is None and not other:
                    return cond.pos
                rec = _failed_record(cond.pos, el, rg or [])
                if other:
                    rec["x"] = 1
                return rec
            if not (value is True or value is NOP):
                other = True
            if spans:
                rg, k = rg or [], 0
                places: dict[int, list[Any]] = {}
                for obj, start, end in spans:
                    if len(rg) >= MAX_ADDRESSES:  # what a violation lists; the state keeps no more
                        break
                    where = places.get(id(obj))
                    if where is None:
                        where = places[id(obj)] = index.locate(id(obj))
                    for idx, order, path in where:
                        rg.append([idx, order, cond.pos, k, f"{path}:{start}-{end}"])
                        k += 1
        rec = {"i": el.trace_idx, "j": el.call_idx, "f": el.flat, "rg": rg or []}
        if other:
            rec["x"] = 1
        return rec

    async def _own_record(self, rule: CompiledRule, v: int, el: Element, index: EventIndex,
                          raw: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Evaluate variable ``v``'s own conditions on ``el``, in body order, once."""
        rec: dict[str, Any] = {"i": el.trace_idx, "j": el.call_idx, "f": el.flat, "rg": []}
        store = {rule.vars[v].decl: el.obj}
        for cond in self._own[rule.index][v]:
            out = evaluate_fast(cond.fast, store, index) if cond.fast is not None else None
            if out is None:  # the interpreter decides (fast=None: the fast path gave up already)
                out = await evaluate(cond.expr, store, rule.globals, self._ctx, index, None)
            if _record_outcome(rec, cond, out):
                break
        return self._finish_record(rule, v, el, rec, raw)

    @staticmethod
    def _finish_record(rule: CompiledRule, v: int, el: Element, rec: dict[str, Any],
                       raw: list[dict[str, Any]] | None) -> dict[str, Any]:
        if rec.get("k") != FALSE:
            i, order, p = object_place(el)
            rec["rg"].append([i, order, len(rule.conds) + v, 0, p])
        if v in rule.needs_object and raw is not None:
            rec["ev"] = raw[el.raw_pos]
        return rec

    async def _match_rule(self, rule: CompiledRule, by_kind: dict[str, list[Element]],
                          raw: list[dict[str, Any]] | None, old: dict[tuple[int, int], list[dict[str, Any]]], head: dict[str, Any], index: EventIndex,
                          objects: dict[int, Any], links: dict[int, dict[str, Any]], budget: Deadline, room: int,
                          rebuild: bool = False
                          ) -> tuple[list[Match], list[list[dict[str, Any]]], list[list[dict[str, Any]]], bool]:
        """The rule's matches binding a pending element (at most ``room``; the last value says
        whether there were more), and the candidate records and witnesses the state keeps (only
        those when ``rebuild``: the past's matches were answered already)."""
        nvars = len(rule.vars)
        new: list[list[_Cand]] = [[] for _ in range(nvars)]
        # (record, element) of elements failing an own condition: nearly all of them, and
        # needed as candidates only when a condition raises, so no _Cand is made up front (and
        # for most, only the failing position instead of a record: _failed_record makes it)
        failed: list[list[tuple[dict[str, Any] | int, Element]]] = [[] for _ in range(nvars)]
        own = self._own[rule.index]
        for v, var in enumerate(rule.vars):
            conds, decl, new_v, failed_v = own[v], var.decl, new[v], failed[v]
            with_object = v in rule.needs_object
            for el in by_kind.get(var.type, ()):
                budget.check()
                rec = self._own_record_fast(conds, decl, el, index)
                if rec is None:
                    rec = await self._own_record(rule, v, el, index, raw)
                elif isinstance(rec, int):
                    if not with_object:
                        failed_v.append((rec, el))  # its record is made if it is ever kept
                        continue
                    rec = self._finish_record(rule, v, el, _failed_record(rec, el, []), raw)
                else:
                    self._finish_record(rule, v, el, rec, raw)
                if with_object and id(el.obj) in links:
                    rec["kc"] = links[id(el.obj)]  # the call it is linked to, for re-reading
                if rec.get("k") == FALSE:
                    failed_v.append((rec, el))
                else:
                    new_v.append(_Cand(rec, el, True))
        # kept records: live candidates, and "witnesses" (events that failed an own condition,
        # the earliest per failing position, and those in a ~> tail), which only matter when an
        # own condition raises: invariant then aborts if any assignment reaches the error first
        kept: list[list[dict[str, Any]]] = []
        for v, keep in enumerate(rule.keep):
            if keep is None:
                kept.append(old.get((rule.index, v), []))
            elif keep > 0:
                kept.append(head["tail"].get(str(rule.index), {}).get(str(v), []))
            else:
                kept.append([])
        new_recs = [[c.rec for c in new[v]] for v in range(nvars)]
        new_witnesses: list[list[dict[str, Any]]] = [[] for _ in range(nvars)]
        for v, keep in enumerate(rule.keep):
            if keep is None:
                seen = {r["st"] for r in kept[v] if r.get("k") == FALSE}
                for rec, el in failed[v]:
                    st = rec if isinstance(rec, int) else rec["st"]
                    if st not in seen:
                        seen.add(st)
                        new_witnesses[v].append(_record_of(rec, el))
            elif keep and keep > 0:
                new_witnesses[v] = [_record_of(rec, el) for rec, el in failed[v]]
        if rebuild or (not any(new) and not any(failed)):
            return [], new_recs, new_witnesses, False

        raising = any(c.rec.get("k") == RAISE for v in range(nvars) for c in new[v]) or \
            any(r.get("k") == RAISE for v in range(nvars) for r in kept[v])
        if not raising and not any(new):
            return [], new_recs, new_witnesses, False
        stored: list[list[_Cand]] = [[] for _ in range(nvars)]
        witnesses: list[list[_Cand]] = [[] for _ in range(nvars)]
        for v in range(nvars):
            for r in kept[v]:
                (witnesses if r.get("k") == FALSE else stored)[v].append(_Cand(r, None, False))
        if raising:
            # walk every assignment in body order, without pruning, so the error surfaces
            # exactly where invariant's evaluation would hit it
            domains_new = [new[v] + [_Cand(_record_of(rec, el), el, True) for rec, el in failed[v]]
                           for v in range(nvars)]
            stored = [stored[v] + witnesses[v] for v in range(nvars)]
        else:
            domains_new = new
        matches: list[Match] = []
        arrows = [c for c in rule.conds if c.kind == ARROW]

        def flow_ok(assign: list[_Cand | None]) -> bool:
            for c in arrows:
                a, b = assign[c.vars[0]], assign[c.vars[1]]
                if a is None or b is None:
                    continue
                fa, fb = a.rec["f"], b.rec["f"]
                if not (fa == fb - 1 if c.direct else fa < fb):
                    return False
            return True

        # whether any variable from v on has a pending element: an assignment must bind one, so
        # a subtree of past candidates only is never walked (what made a long session slow)
        new_from = [False] * (nvars + 1)
        for v in range(nvars - 1, -1, -1):
            new_from[v] = new_from[v + 1] or bool(domains_new[v])

        async def visit(v: int, assign: list[_Cand | None], any_new: bool) -> None:
            budget.check()
            if v == nvars:
                if any_new:
                    # (every variable is bound here)
                    m = await self._walk(rule, cast(list[_Cand], assign), objects, index)
                    if m is not None:
                        matches.append(m)
                        if len(matches) > room:
                            raise _Enough()  # one past the cap: there are more, stop here
                return
            if not any_new and not new_from[v]:
                return
            last = v == nvars - 1
            choices = domains_new[v] if (last and not any_new) else stored[v] + domains_new[v]
            for cand in choices:
                assign[v] = cand
                if raising or flow_ok(assign):
                    await visit(v + 1, assign, any_new or cand.new)
            assign[v] = None

        try:
            await visit(0, [None] * nvars, False)
        except _Enough:
            return matches[:room], new_recs, new_witnesses, True
        return matches, new_recs, new_witnesses, False

    async def _object(self, rule: CompiledRule, v: int, cand: _Cand, objects: dict[int, Any],
                      index: EventIndex) -> Any:
        if cand.el is not None:
            return cand.el.obj
        rec = cand.rec
        # one object per trace index: variables bound to the same event share it, as in invariant
        if rec["i"] not in objects:
            if "ev" not in rec:
                raise EngineError(f"rule {rule.index}: a kept candidate lacks its event")
            parsed, _ = parse_batch([rec["ev"]], rec["i"], None)
            objects[rec["i"]] = parsed[0]
            index.add(parsed[0], rec["i"])
            if "kc" in rec and type(parsed[0]) is ToolOutput:
                call = rebuild_call(rec["kc"])
                parsed[0]._tool_call = call  # noqa: SLF001 - invariant-ai's link from an output to its call
                index.add(call, rec["kc"]["i"], rec["kc"]["j"])
        event = objects[rec["i"]]
        return event if rec["j"] < 0 else event.tool_calls[rec["j"]]

    async def _walk(self, rule: CompiledRule, assign: list[_Cand], objects: dict[int, Any],
                    index: EventIndex) -> Match | None:
        """invariant's short-circuited body for one assignment: a Match, None, or EngineError."""
        other = False
        extra: list[list[Any]] = []
        leaks: list[list[Any]] = [lk for a in assign for lk in a.rec.get("lk", ())]
        for c in rule.conds:
            if c.kind == DECL:
                continue
            if c.kind == ARROW:
                fa, fb = assign[c.vars[0]].rec["f"], assign[c.vars[1]].rec["f"]
                if not (fa == fb - 1 if c.direct else fa < fb):
                    return None
            elif c.kind == OWN:
                rec = assign[c.vars[0]].rec
                if rec.get("st") == c.pos:
                    if rec["k"] == RAISE:
                        raise EngineError(f"rule {rule.index}: {rec.get('err', 'error')}")
                    return None
            else:  # JOIN
                store = {}
                for v in c.vars:
                    store[rule.vars[v].decl] = await self._object(rule, v, assign[v], objects, index)
                out = await evaluate(c.expr, store, rule.globals, self._ctx, index, c.fast)
                if out.status == RAISE:
                    raise EngineError(f"rule {rule.index}: {out.error}")
                if out.status == FALSE:
                    return None
                other = other or out.status == OTHER
                extra.extend([i, s, c.pos, k, p] for k, (i, s, p) in enumerate(out.marks))
                leaks.extend([c.pos, n, name, part, places]
                             for n, (name, part, places) in enumerate(out.leaks))
        if other or any(a.rec.get("x") for a in assign):
            return None
        ranges = [r for a in assign for r in a.rec["rg"]] + extra
        # names left in the store join the assignment after the variables, in evaluation order
        # (first write fixes the place, the last one the value), as in invariant's input_dict
        merged: dict[str, list[Any]] = {}
        for _pos, _n, name, part, places in sorted(leaks, key=lambda lk: (lk[0], lk[1])):
            merged[name] = [part, places] if name not in merged else [part, places]
        base = len(rule.conds) + len(rule.vars)
        for order, (_name, (_part, places)) in enumerate(merged.items()):
            ranges.extend([i, o, base + order, 0, p] for i, o, p in places)
        ranges.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
        del ranges[MAX_ADDRESSES:]
        parts = [(var.name, assign[v].rec["i"]) for v, var in enumerate(rule.vars)]
        parts += [(name, part) for name, (part, _) in merged.items()]
        parts.sort(key=lambda x: x[0])
        key = str((rule.index, tuple(p for _, p in parts)))
        message: str | None = rule.message
        kwargs: dict[str, Any] = {}
        if message is None:
            store = {rule.vars[v].decl: await self._object(rule, v, a, objects, index)
                     for v, a in enumerate(assign)}
            message, kwargs = await self._raise_value(rule, store)
            if message is None:
                return None
        return Match(rule_index=rule.index, message=message, key=key,
                     addresses=["messages." + r[4] for r in ranges], kwargs=kwargs)

    async def _raise_value(self, rule: CompiledRule, store: dict[Any, Any]) -> tuple[str | None, dict[str, Any]]:
        from invariant.analyzer.stdlib.invariant.errors import ErrorInformation

        try:
            exc = await evaluate_value(rule.raise_expr, store, rule.globals, self._ctx)
        except Exception as err:  # noqa: BLE001 - the reference aborts the same way
            raise EngineError(f"rule {rule.index}: {type(err).__name__}: {err}") from err
        if isinstance(exc, ErrorInformation):
            return error_message(exc), error_kwargs(exc)
        if exc is None:
            return None, {}
        return str(exc), {}

    async def _run_fallback(self, raw_entries: list[tuple[int, dict[str, Any]]], length: int,
                            pending: list[dict[str, Any]], deadline: float | None = None) -> list[Match]:
        window = sorted((e for _, e in raw_entries if e["i"] >= length - self.max_history),
                        key=lambda e: e["i"])
        offset = window[0]["i"] if window else length
        past = [e["e"] for e in window]

        async def run() -> Any:
            return await self._sub.a_analyze_pending(past, pending)

        if self.pool is not None:
            errors = await self.pool.analyze(self.policy, self.fallback, past, pending, deadline)
        else:
            try:
                errors = (await within(self._thread.run(run()) if self._thread else run(), deadline)).errors
            except BudgetExceeded:
                raise
            except Exception as exc:  # noqa: BLE001 - any policy failure fails the batch closed
                raise EngineError(f"{type(exc).__name__}: {exc}") from exc
        out = []
        for err in errors:
            try:
                sub_rule, idx = pyast.literal_eval(str(err.key))
                rule = self.fallback[sub_rule]
                key = str((rule, tuple(i + offset if isinstance(i, int) and i >= 0 else i
                                       for i in idx)))
            except (ValueError, SyntaxError, TypeError, IndexError):
                rule, key = -1, str(err.key)
            out.append(error_to_match(err, offset, rule, key))
        return out
