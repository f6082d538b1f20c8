"""Evaluating one rule condition on bound events with invariant-ai's own interpreter.

The incremental engine decides *which* variable assignments to look at; what a condition means
(``in`` marking substring ranges, ``tool is tool:name``, detector calls, ``len`` ...) is left to
invariant-ai's :class:`~invariant.analyzer.runtime.evaluation.Interpreter`, so the two engines can
not disagree on a condition. This module parses a pending batch into invariant's event objects
exactly as ``Input`` does, flattens it into the order invariant's dataflow graph uses, evaluates
single conditions, and turns the ranges a condition marks into whole-trace addresses.

Example::

    >>> import asyncio
    >>> from monitor.engine.conditions import parse_flat, prepared_events
    >>> prepared, last = prepared_events([{"role": "assistant", "content": None, "tool_calls": [
    ...     {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}], None)
    >>> _, elements, _ = parse_flat(prepared, 5, 0)
    >>> [(e.kind, e.trace_idx, e.call_idx) for e in elements]
    [('Message', 5, -1), ('ToolCall', 5, 0)]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from invariant.analyzer.runtime.evaluation import INTERPRETER_STACK, NOP, Interpreter
from invariant.analyzer.runtime.evaluation_context import EvaluationContext
from invariant.analyzer.runtime.function_cache import call_either_way
from invariant.analyzer.runtime.input import Input
from invariant.analyzer.runtime.nodes import Contents, Event, Message, ToolCall, ToolOutput
from pydantic import BaseModel

from monitor.errors import MonitorError
from monitor.limits import MAX_ADDRESSES

# The status of one condition for one assignment, as invariant's rule body sees it.
TRUE, FALSE, RAISE, OTHER = "T", "F", "R", "X"


def parse_batch(events: list[dict[str, Any]], first_idx: int,
                last_call_id: str | None) -> tuple[list[Any], str | None]:
    """Parse ``events`` as ``Input`` would if they followed ``first_idx`` earlier events.

    ``last_call_id`` is the id of the past's last tool call: invariant gives a tool output without
    ``tool_call_id`` the id of the latest call before it, which may lie in an earlier batch.
    Returns the parsed events (``metadata.trace_idx`` set) and the new last call id.
    """
    prepared, running = prepared_events(events, last_call_id)
    return parse_prepared(prepared, first_idx), running


def parse_prepared(prepared: list[Any], first_idx: int) -> list[Any]:
    """:func:`parse_batch` for events :func:`prepared_events` made ready already."""
    return parse_flat(prepared, first_idx, 0)[0]


def parse_flat(prepared: list[Any], first_idx: int, flat_start: int,
               skip_outputs: bool = False) -> tuple[list[Any], list[Element], int]:
    """Parse ``prepared`` (see :func:`parse_prepared`) and flatten it into the order invariant's
    ``Dataflow`` adds objects in (a message, then its tool calls), in one pass: the parsed events,
    their elements, and the flow position after them.

    ``skip_outputs``: tool outputs are left None where they certainly parse (for a policy no
    variable of which binds a tool output or follows one to its call: their objects would never
    be read); they keep their place in the order but give no element.

    >>> _, els, end = parse_flat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "ok",
    ...     "tool_call_id": None}], 3, 7, skip_outputs=True)
    >>> [(e.kind, e.trace_idx, e.flat) for e in els], end
    ([('Message', 3, 7)], 9)
    """
    parsed = _parse_plain(prepared, skip_outputs)
    if parsed is None:
        parsed = Input.parse_input(None, prepared)  # (uses no instance state)
    out: list[Element] = []
    flat = flat_start
    for pos, event in enumerate(parsed):
        if event is None:  # a skipped tool output still takes its place in the order
            flat += 1
            continue
        idx = first_idx + pos
        event.metadata["trace_idx"] = idx
        t = type(event)
        out.append(Element(event, t.__name__, idx, -1, flat, event, pos))
        flat += 1
        calls = event.tool_calls if t is Message else (
            None if t is ToolOutput or t is ToolCall else getattr(event, "tool_calls", None))
        if calls:
            for j, call in enumerate(calls):
                call.metadata["trace_idx"] = idx
                if t is Message:
                    out.append(Element(call, type(call).__name__, idx, j, flat, event, pos))
                    flat += 1
    return parsed, out, flat


def _parse_plain(events: list[Any], skip_outputs: bool = False) -> list[Any] | None:
    """``Input.parse_input`` for messages, tool outputs and tool calls, without its deep copy.

    The copy only guards the caller's dicts against the two edits parse_input makes (``server``
    from metadata, string arguments decoded); here just the dicts being edited are copied, and the
    models copy the top-level dicts they keep (``metadata``, ``arguments``), so the objects made
    are equal to parse_input's. None for anything else (tool lists, non-dicts, a failure): the
    caller runs parse_input itself, which then fails or warns exactly as invariant does.
    ``skip_outputs``: a tool output that would parse is None in the result (nothing reads it).
    """
    out: list[Any] = []
    tool_calls: dict[Any, Any] = {}
    try:
        for event in events:
            if type(event) is not dict:
                return None
            if "metadata" in event and "server" in event["metadata"]:
                event = {**event, "server": event["metadata"]["server"]}
            if "role" in event:
                if event["role"] != "tool":
                    calls = event.get("tool_calls")
                    if calls:
                        for c in calls:
                            if type(c["function"]["arguments"]) is str:
                                event = {**event, "tool_calls": [_decoded_args(c) for c in calls]}
                                break
                    msg = _message(event)
                    out.append(msg)
                    if msg.tool_calls is not None:
                        for call in msg.tool_calls:
                            tool_calls[call.id] = call
                else:
                    # prepared_events made tool_call_id explicit already
                    if "tool_call_id" not in event:
                        return None
                    if skip_outputs and _plain_output(event, build=False):
                        out.append(None)
                        continue
                    tool_out = _plain_output(event) or _output(event)
                    if tool_out.tool_call_id in tool_calls:
                        tool_out.__pydantic_private__["_tool_call"] = tool_calls[tool_out.tool_call_id]
                    out.append(tool_out)
            elif "type" in event:
                call = _call(event)
                tool_calls[call.id] = call
                out.append(call)
            else:
                return None
    except Exception:  # noqa: BLE001 - parse_input raises it again, with its own warning
        return None
    return out


# the models' validators called directly: what ``Message(**event)`` does, minus the keyword
# arguments and ``__init__`` frame (a third of the cost of building a small event)
_message = Message.__pydantic_validator__.validate_python
_output = ToolOutput.__pydantic_validator__.validate_python
_call = ToolCall.__pydantic_validator__.validate_python


_OUTPUT_FIELDS = frozenset(ToolOutput.model_fields)
_ABSENT: Any = object()  # a key that is not there
_new, _set = object.__new__, object.__setattr__


def _plain_output(event: dict[str, Any], build: bool = True) -> Any:
    """``ToolOutput(**event)`` for a tool output of plain strings, built directly: its private
    attribute makes validation run pydantic's Python-level ``model_post_init``, which costs more
    than the validation itself. None for any other shape (validation decides). ``build=False``
    only checks that validation cannot fail (True then).

    >>> e = {"role": "tool", "content": "ok", "tool_call_id": "1", "metadata": {"a": 1}}
    >>> o = _plain_output(e)
    >>> v = ToolOutput(**e)
    >>> (o == v, o.__dict__ == v.__dict__, o.model_fields_set == v.model_fields_set)
    (True, True, True)
    """
    role, content, cid = event["role"], event.get("content"), event.get("tool_call_id")
    meta = event.get("metadata", _ABSENT)
    server = event.get("server")
    if type(role) is not str or (content is not None and type(content) is not str) \
            or (cid is not None and type(cid) is not str) or (server is not None and type(server) is not str) \
            or not (meta is _ABSENT or meta is None or type(meta) is dict):
        return None
    if not build:
        return True
    # validation copies the metadata too: trace_idx is written into it
    meta = {} if meta is _ABSENT else dict(meta) if meta is not None else None
    out = _new(ToolOutput)
    _set(out, "__dict__", {"metadata": meta, "server": server, "role": role, "content": content,
                           "tool_call_id": cid})
    _set(out, "__pydantic_fields_set__", event.keys() & _OUTPUT_FIELDS)
    _set(out, "__pydantic_extra__", None)
    _set(out, "__pydantic_private__", {})
    return out


def _decoded_args(call: Any) -> Any:
    if type(call["function"]["arguments"]) is not str:
        return call
    return {**call, "function": {**call["function"],
                                 "arguments": json.loads(call["function"]["arguments"])}}


def prepared_events(events: list[dict[str, Any]],
                    last_call_id: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The events with the implicit ``tool_call_id`` of tool outputs made explicit (what
    ``Input.parse_input`` fills in from the latest call so far), and the last call id after them."""
    out = []
    running = last_call_id
    for event in events:
        if isinstance(event, dict):
            role = event.get("role", _ABSENT)
            if role == "tool":
                if "tool_call_id" not in event:
                    event = {**event, "tool_call_id": running}
            elif role is not _ABSENT:
                calls = event.get("tool_calls")
                if calls:
                    for call in calls:
                        running = call.get("id") if isinstance(call, dict) else running
            elif "type" in event:
                running = event.get("id")
        out.append(event)
    return out, running


@dataclass(slots=True)
class Element:
    """One node of invariant's dataflow order: an event, or a tool call nested in a message."""

    obj: Any
    kind: str  # the class name invariant selects variables by: Message, ToolCall, ToolOutput, ...
    trace_idx: int
    call_idx: int  # index in the parent message's tool_calls, -1 for a top-level event
    flat: int  # position in the flattened order; a -> b iff flat(a) < flat(b)
    event: Any = None  # the top-level event holding obj
    raw_pos: int = 0  # index of the top-level event in its batch


class Occurrences:
    """Where each object of one event sits, in the order invariant's ``RangeLocator`` visits it.

    invariant reports a marked object at every place the locator meets it (the check precedes
    the visited-set check), so an object may have several (sequence number, path) places.
    """

    def __init__(self, event: Any, trace_idx: int, path: list[Any] | None = None,
                 order: list[int] | None = None) -> None:
        self.places: dict[int, list[tuple[list[int], str]]] = {}
        self._visited: set[int] = set()
        self._visit(event, [trace_idx] + (path or []), order or [])

    def _visit(self, obj: Any, path: list[Any], order: list[int]) -> None:
        # ``order`` (sibling numbers along the path) sorts places in the locator's visiting order
        # one id() per node: with an audit hook installed (the policy sandbox's) each call costs one
        key = id(obj)
        self.places.setdefault(key, []).append((order, ".".join(map(str, path))))
        if key in self._visited:
            return
        self._visited.add(key)
        if type(obj) is dict:
            for n, k in enumerate(obj):
                self._visit(obj[k], path + [k], order + [n])
        elif type(obj) is list:
            for i, v in enumerate(obj):
                self._visit(v, path + [i], order + [i])
        elif isinstance(obj, Contents):
            for i in range(len(obj.root)):
                self._visit(obj.root[i], path + [i], order + [i])
        elif isinstance(obj, BaseModel):
            for n, name in enumerate(obj.__class__.model_fields):
                self._visit(getattr(obj, name), path + [name], order + [n])


class EventIndex:
    """Lazily built :class:`Occurrences` of the events an evaluation may mark, merged into one
    map from object to places: a lookup costs the same whatever the number of events (a batch of
    2,000 events marking one string each was 4 million steps)."""

    def __init__(self) -> None:
        self._known: dict[int, Any] = {}  # id(event) -> event: indexed (kept alive: ids stay valid)
        self._places: dict[int, list[tuple[int, list[int], str]]] = {}
        self._added: list[tuple[Any, int, int]] = []  # indexed on the first locate: most never are

    def add(self, event: Any, trace_idx: int, call_idx: int = -1) -> None:
        """Index ``event`` (or, with ``call_idx``, a tool call that sits in event ``trace_idx``'s
        ``tool_calls``) for locating marks on it."""
        self._added.append((event, trace_idx, call_idx))

    def locate(self, obj_id: int) -> list[tuple[int, list[int], str]]:
        """(trace index, visiting order, path) of every place ``obj_id`` has in a known event, in
        the order the events were added."""
        if self._added:
            places = self._places
            for event, idx, call_idx in self._added:
                if id(event) in self._known:  # the first addition of an event counts
                    continue
                self._known[id(event)] = event
                if call_idx < 0:
                    occ = Occurrences(event, idx)
                else:
                    occ = Occurrences(event, idx, ["tool_calls", call_idx], [_TOOL_CALLS_FIELD, call_idx])
                for oid, where in occ.places.items():
                    found = places.get(oid)
                    if found is None:
                        found = places[oid] = []
                    found.extend((idx, seq, path) for seq, path in where)
            self._added.clear()
        return self._places.get(obj_id, [])


class DirectContext(EvaluationContext):  # type: ignore[misc]  # invariant-ai is untyped
    """An evaluation context that calls functions directly.

    invariant's function cache keys objects by ``id()``, which is wrong once events are rebuilt
    (see the notes); the incremental engine caches per event itself, so no cache is needed here.
    Flow, quantifiers over the input and policy parameters never reach this context: the
    compiler sends rules using them to the reference engine.
    """

    def __init__(self, symbol_table: Any) -> None:
        super().__init__(symbol_table=symbol_table)

    async def acall_function(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        return await call_either_way(function, *args, **kwargs)

    def increment_evaluation_counter(self) -> None:
        # invariant caps rule-body evaluations per analysis; the engine's work is bounded by
        # the batch and the kept candidates instead (and the reference runs uncapped here)
        pass

    def get_input(self) -> Input:
        # only predicates the compiler proved never select from the input get here
        return _EMPTY_INPUT


_EMPTY_INPUT = Input([])
_TOOL_CALLS_FIELD = list(Message.model_fields).index("tool_calls")


def call_record(event: dict[str, Any], trace_idx: int, call_idx: int) -> dict[str, Any] | None:
    """What a later tool output needs of a tool call: its id and the call as sent."""
    call = event if call_idx < 0 else event["tool_calls"][call_idx]
    if not isinstance(call, dict) or call.get("id") is None:
        return None
    return {"id": call["id"], "i": trace_idx, "j": call_idx, "call": call}


def rebuild_call(rec: dict[str, Any]) -> Any:
    """The ToolCall object ``Input.parse_input`` makes of a kept :func:`call_record`."""
    import copy
    import json

    call = copy.deepcopy(rec["call"])
    if rec["j"] >= 0:
        if type(call["function"]["arguments"]) is str:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    elif "metadata" in call and "server" in call["metadata"]:
        call["server"] = call["metadata"]["server"]
    obj = ToolCall(**call)
    obj.metadata["trace_idx"] = rec["i"]
    return obj


def link_outputs(parsed: list[Any], prepared: list[dict[str, Any]],
                 past_calls: dict[str, dict[str, Any]], index: "EventIndex") -> dict[int, dict[str, Any]]:
    """Give pending tool outputs the past call invariant links them to (``_tool_call``).

    ``Input.parse_input`` links an output to the latest call with its id parsed before it; the
    batch's own calls are linked already, the past's come from ``past_calls`` (id -> record).
    Returns, by ``id()`` of each linked output, the record of its call (kept with candidates).
    """
    latest: dict[Any, dict[str, Any]] = {}
    links: dict[int, dict[str, Any]] = {}
    for pos, event in enumerate(parsed):
        idx = event.metadata["trace_idx"]
        if type(event) is Message:
            for j, c in enumerate(event.tool_calls or []):
                rec = call_record(prepared[pos], idx, j)
                if rec is not None:
                    latest[c.id] = rec
        elif type(event) is ToolCall:
            rec = call_record(prepared[pos], idx, -1)
            if rec is not None:
                latest[event.id] = rec
        elif type(event) is ToolOutput:
            if event.tool_call_id in latest:
                links[id(event)] = latest[event.tool_call_id]
            elif event.tool_call_id in past_calls:
                rec = past_calls[event.tool_call_id]
                obj = rebuild_call(rec)
                event._tool_call = obj  # noqa: SLF001 - invariant-ai's link from an output to its call
                index.add(obj, rec["i"], rec["j"])
                links[id(event)] = rec
    return links


@dataclass
class ConditionOutcome:
    """What one condition gave for one assignment: status, marked ranges, error text."""

    status: str
    marks: list[tuple[int, list[int], str]] = field(default_factory=list)  # (idx, order, path)
    error: str = ""
    # variables the expression left in the store (``:=``, and list comprehensions, whose loop
    # variable invariant leaks into the assignment): (name, key part, places of the value)
    leaks: list[tuple[str, Any, list[Any]]] = field(default_factory=list)


def key_part(value: Any) -> Any:
    """What invariant's ``EvaluationResult.result_key`` takes from one assigned value."""
    if type(value) is dict and "key" in value:
        return value["key"]
    if isinstance(value, Event) and "trace_idx" in value.metadata:
        return value.metadata["trace_idx"]
    return -1


async def evaluate(expr: Any, store: dict[Any, Any], globals_: Any, ctx: DirectContext,
                   index: EventIndex, fast: Any = None) -> ConditionOutcome:
    """Evaluate one rule-body expression under ``store`` (VariableDeclaration -> object).

    ``store`` is updated in place, as invariant's interpreter updates its variable store.

    The status is what invariant's short-circuited rule body makes of the value: ``False`` stops
    the body (F), an exception aborts the whole analysis (R), ``True`` or an assignment's NOP lets
    the body go on (T), anything else lets it go on but keeps it from ever being ``True`` (X).
    """
    value: Any = _SLOW
    before = set(store)
    if fast is not None:
        spans: list[tuple[Any, int, int]] = []
        try:
            value = fast(store, spans)
        except _Slow:
            value = _SLOW
        except Exception:  # noqa: BLE001 - let the interpreter raise it, with its own message
            value = _SLOW
        if value is not _SLOW:
            ranges = [(id(o), a, b) for o, a, b in spans]
    if value is _SLOW:
        token = INTERPRETER_STACK.set([])  # a private stack: no other evaluation is our parent
        try:
            value, found = await Interpreter.eval(expr, store, globals_,
                                                  evaluation_context=ctx, return_ranges=True)
        except Exception as exc:  # noqa: BLE001 - the reference aborts on any exception
            return ConditionOutcome(RAISE, error=f"{type(exc).__name__}: {exc}")
        finally:
            INTERPRETER_STACK.reset(token)
        ranges = [(int(r.object_id), r.start, r.end) for r in found]
    if value is False:
        return ConditionOutcome(FALSE)
    status = TRUE if (value is True or value is NOP) else OTHER
    marks: list[tuple[int, list[int], str]] = []
    places: dict[int, list[Any]] = {}
    for obj_id, start, end in ranges:
        if len(marks) >= MAX_ADDRESSES:  # what a violation lists (a 1 MB text may hold 250,000)
            break
        suffix = f":{start}-{end}" if start is not None and end is not None else ""
        where = places.get(obj_id)
        if where is None:
            where = places[obj_id] = index.locate(obj_id)
        for idx, order, path in where:
            marks.append((idx, order, path + suffix))
    leaks = []
    for decl in store:
        if decl not in before:
            value = store[decl]
            origin = value["__origin__"] if type(value) is dict and "__origin__" in value else value
            leaks.append((decl.name, key_part(value), index.locate(id(origin))))
    return ConditionOutcome(status, marks, leaks=leaks)


# shared: callers only read an outcome
_FALSE_OUTCOME, _TRUE_OUTCOME, _OTHER_OUTCOME = (ConditionOutcome(FALSE), ConditionOutcome(TRUE),
                                                 ConditionOutcome(OTHER))


def evaluate_fast(fast: Any, store: dict[Any, Any], index: EventIndex) -> ConditionOutcome | None:
    """:func:`evaluate` of a condition with a plain-Python evaluator (see :func:`compile_fast`),
    without a coroutine; None when the interpreter must decide. Fast conditions assign nothing,
    so nothing leaks into the store."""
    spans: list[tuple[Any, int, int]] = []
    try:
        value = fast(store, spans)
    except Exception:  # noqa: BLE001 - _Slow, or an error the interpreter reports in its words
        return None
    if value is False:
        return _FALSE_OUTCOME
    status = TRUE if (value is True or value is NOP) else OTHER
    if not spans:
        return _TRUE_OUTCOME if status == TRUE else _OTHER_OUTCOME
    marks: list[tuple[int, list[int], str]] = []
    places: dict[int, list[Any]] = {}
    for obj, start, end in spans:
        if len(marks) >= MAX_ADDRESSES:
            break
        suffix = f":{start}-{end}"
        where = places.get(id(obj))
        if where is None:
            where = places[id(obj)] = index.locate(id(obj))
        for idx, order, path in where:
            marks.append((idx, order, path + suffix))
    return ConditionOutcome(status, marks)


async def evaluate_value(expr: Any, store: dict[Any, Any], globals_: Any, ctx: DirectContext) -> Any:
    """Evaluate an expression to its value (e.g. a raise's ``PolicyViolation(...)``)."""
    token = INTERPRETER_STACK.set([])
    try:
        return await Interpreter.eval(expr, dict(store), globals_, evaluation_context=ctx,
                                      partial=False)
    finally:
        INTERPRETER_STACK.reset(token)


def object_place(element: Element) -> tuple[int, list[int], str]:
    """Where invariant locates a bound variable's own object (``messages.2.tool_calls.0``).

    An event or tool call object sits at exactly one place, known without a traversal.
    """
    if element.call_idx < 0:
        return element.trace_idx, [], str(element.trace_idx)
    return (element.trace_idx, [_TOOL_CALLS_FIELD, element.call_idx],
            f"{element.trace_idx}.tool_calls.{element.call_idx}")


# -- fast conditions -------------------------------------------------------------------------
# The commonest condition shapes evaluated in plain Python, with exactly the interpreter's
# semantics (the code paths of Interpreter.visit_BinaryExpr / visit_MemberAccess / visit_Is they
# mirror are named below). Anything unusual at run time raises _Slow and the interpreter decides.


class _Slow(MonitorError):
    pass


_SLOW = object()
def _access(node: Any, var_decls: set[int]) -> Any:
    """``v.a.b`` on event objects and dict keys (visit_MemberAccess cases 3 and 4)."""
    from invariant.analyzer.language import ast
    from invariant.analyzer.runtime.nodes import Function
    from invariant.analyzer.runtime.utils.invariant_attributes import invariant_attr

    members = []
    while isinstance(node, ast.MemberAccess):
        members.append(node.member)
        node = node.expr
    if type(node) is not ast.Identifier or id(node.id) not in var_decls:
        return None
    decl = node.id
    members.reverse()
    models = (Message, ToolCall, ToolOutput, Function)
    # the attributes each model's __invariant_attribute__ hands out as they are: a plain value
    # read that way needs none of invariant_attr's checks (it would return it unchanged)
    direct = {Message: {"role", "content", "tool_calls", "metadata"},
              ToolCall: {"function", "type", "id", "metadata"},
              ToolOutput: {"role", "content", "tool_call_id", "metadata"},
              Function: {"name", "arguments"}}
    plain = (str, int, float, bool, type(None))

    if len(members) == 1:  # ``v.a``, the commonest shape: the loop below for one member
        m = members[0]
        direct_types = tuple(t for t in models if m in direct[t])

        def get_one(store: dict[Any, Any]) -> Any:
            obj = store[decl]
            t = type(obj)
            if t in direct_types:
                value = getattr(obj, m)
                if type(value) in plain:
                    return value
                return invariant_attr(obj, m)
            if t is dict and m in obj:
                return obj[m]
            if t in models:
                return invariant_attr(obj, m)
            raise _Slow()
        return get_one

    def get(store: dict[Any, Any]) -> Any:
        obj = store[decl]
        for m in members:
            t = type(obj)
            if t is dict and m in obj:
                obj = obj[m]
            elif t in models:
                if m in direct[t]:
                    value = getattr(obj, m)
                    if type(value) in plain:
                        obj = value
                        continue
                obj = invariant_attr(obj, m)
            else:
                raise _Slow()
        return obj

    return get


def _regex(pattern: str) -> Any:
    """``pattern`` compiled once (what re.match/re.finditer would use), None if it is invalid:
    the interpreter then raises as invariant does."""
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _literal(node: Any) -> tuple[bool, Any]:
    from invariant.analyzer.language import ast

    if type(node) in (ast.StringLiteral, ast.NumberLiteral, ast.BooleanLiteral):
        if type(node) is ast.StringLiteral and node.modifier:
            return False, None
        return True, node.value
    if type(node) is ast.NoneLiteral:
        return True, None
    return False, None


def compile_fast(expr: Any, var_decls: set[int]) -> Any:
    """A plain-Python evaluator ``fn(store, spans) -> value`` for a condition, or None.

    ``var_decls`` holds ``id()`` of the rule's variable declarations.
    """
    return _fast_bool(expr, var_decls)


def _fast(node: Any, var_decls: set[int]) -> Any:
    from invariant.analyzer.language import ast

    if isinstance(node, ast.MemberAccess):
        return _access(node, var_decls)
    if type(node) is ast.Identifier and id(node.id) in var_decls:
        decl = node.id
        return lambda store: store[decl]
    if type(node) is not ast.BinaryExpr:
        return None
    op = node.op
    if op in ("and", "or"):
        left, right = _fast_bool(node.left, var_decls), _fast_bool(node.right, var_decls)
        if left is None or right is None:
            return None
        if op == "and":
            def both(store: dict[Any, Any], spans: list[tuple[Any, int, int]]) -> Any:
                lv, rv = left(store, spans), right(store, spans)  # no short circuit, as invariant
                if lv is False or rv is False:
                    return False
                return lv and rv
            return both

        def either(store: dict[Any, Any], spans: list[tuple[Any, int, int]]) -> Any:
            lv, rv = left(store, spans), right(store, spans)
            if lv is True or rv is True:
                return True
            return lv or rv
        return either
    if op == "is" and type(node.right) is ast.ToolReference:
        get = _fast(node.left, var_decls)
        if get is None or isinstance(node.left, ast.BinaryExpr):
            return None
        pattern = _regex(node.right.name + "$")

        def is_tool(store: dict[Any, Any], spans: list[tuple[Any, int, int]]) -> Any:
            value = get(store)
            if type(value) is ToolOutput:
                raise _Slow()  # invariant follows the output to its call
            if type(value) is not ToolCall:
                return None  # ToolCallMatcher.match returns None here
            if pattern is None:
                raise _Slow()
            return pattern.match(value.function.name) is not None
        return is_tool
    if op == "is" and type(node.right) is ast.UnaryExpr and node.right.op == "not" \
            and type(node.right.expr) is ast.NoneLiteral:
        get = _fast(node.left, var_decls)
        if get is None or isinstance(node.left, ast.BinaryExpr):
            return None
        return lambda store, spans: get(store) is not None
    if op in ("==", "!=", "is", "in"):
        lit_l, lval = _literal(node.left)
        lit_r, rval = _literal(node.right)
        if op == "in" and type(node.right) is ast.ArrayLiteral:
            items = [_literal(e) for e in node.right.elements]
            if not all(ok for ok, _ in items) or lit_l:
                return None
            values = [v for _, v in items]
            get = _fast(node.left, var_decls)
            if get is None or isinstance(node.left, ast.BinaryExpr):
                return None

            def in_list(store: dict[Any, Any], spans: list[tuple[Any, int, int]]) -> Any:
                value = get(store)
                if isinstance(value, list):
                    raise _Slow()
                return value in values
            return in_list
        if lit_l == lit_r:
            return None
        get = _fast(node.right if lit_l else node.left, var_decls)
        if get is None or isinstance(node.right if lit_l else node.left, ast.BinaryExpr):
            return None
        if op == "==":
            return (lambda store, spans: lval == get(store)) if lit_l else \
                (lambda store, spans: get(store) == rval)
        if op == "!=":
            return (lambda store, spans: lval != get(store)) if lit_l else \
                (lambda store, spans: get(store) != rval)
        if op == "is" and type(node.right) is ast.NoneLiteral:
            return lambda store, spans: get(store) is None
        if op == "in" and lit_l and type(lval) is str:
            regex = _regex(lval)

            def contains(store: dict[Any, Any], spans: list[tuple[Any, int, int]]) -> Any:
                value = get(store)
                if value is None:
                    return False  # '<value> in None' is False in invariant
                if type(value) is str:
                    if regex is None:
                        raise _Slow()
                    for m in regex.finditer(value):  # the left side is a regex there
                        spans.append((value, m.start(), m.end()))
                    return lval in value
                if type(value) in (Contents, dict):
                    return lval in value
                raise _Slow()
            return contains
    return None


def _fast_bool(node: Any, var_decls: set[int]) -> Any:
    from invariant.analyzer.language import ast

    if type(node) is ast.UnaryExpr and node.op == "not":
        inner = _fast_bool(node.expr, var_decls)
        return None if inner is None else (lambda store, spans: not inner(store, spans))
    if type(node) is not ast.BinaryExpr:
        return None
    return _fast(node, var_decls)


__all__ = ["Element", "EventIndex", "DirectContext", "ConditionOutcome", "Occurrences", "evaluate",
           "evaluate_fast", "evaluate_value", "object_place", "parse_batch", "parse_flat",
           "parse_prepared", "prepared_events",
           "TRUE", "FALSE", "RAISE", "OTHER", "ToolCall", "ToolOutput", "Message"]
