"""Evaluating one rule condition on bound events with invariant-ai's own interpreter.

The incremental engine decides *which* variable assignments to look at; what a condition means
(``in`` marking substring ranges, ``tool is tool:name``, detector calls, ``len`` ...) is left to
invariant-ai's :class:`~invariant.analyzer.runtime.evaluation.Interpreter`, so the two engines can
not disagree on a condition. This module parses a pending batch into invariant's event objects
exactly as ``Input`` does, flattens it into the order invariant's dataflow graph uses, evaluates
single conditions, and turns the ranges a condition marks into whole-trace addresses.

Example::

    >>> import asyncio
    >>> from monitor.engine.evaluator import parse_batch, flatten
    >>> events, last = parse_batch([{"role": "assistant", "content": None, "tool_calls": [
    ...     {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}], 5, None)
    >>> [(e.kind, e.trace_idx, e.call_idx) for e in flatten(events, 0)]
    [('Message', 5, -1), ('ToolCall', 5, 0)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from invariant.analyzer.runtime.evaluation import INTERPRETER_STACK, NOP, Interpreter
from invariant.analyzer.runtime.evaluation_context import EvaluationContext
from invariant.analyzer.runtime.function_cache import call_either_way
from invariant.analyzer.runtime.input import Input
from invariant.analyzer.runtime.nodes import Contents, Message, ToolCall, ToolOutput

# Outcome of one condition for one assignment, as invariant's rule body sees it.
TRUE, FALSE, RAISE, OTHER = "T", "F", "R", "X"


def parse_batch(events: list[dict[str, Any]], first_idx: int,
                last_call_id: str | None) -> tuple[list[Any], str | None]:
    """Parse ``events`` as ``Input`` would if they followed ``first_idx`` earlier events.

    ``last_call_id`` is the id of the past's last tool call: invariant gives a tool output without
    ``tool_call_id`` the id of the latest call before it, which may lie in an earlier batch.
    Returns the parsed events (``metadata.trace_idx`` set) and the new last call id.
    """
    prepared = []
    running = last_call_id
    for event in events:
        if isinstance(event, dict) and event.get("role") == "tool" and "tool_call_id" not in event:
            event = {**event, "tool_call_id": running}
        if isinstance(event, dict):
            if event.get("role") not in (None, "tool"):
                for call in event.get("tool_calls") or []:
                    running = call.get("id") if isinstance(call, dict) else running
            elif "role" not in event and "type" in event:
                running = event.get("id")
        prepared.append(event)
    parsed = Input.parse_input(None, prepared)  # type: ignore[arg-type] - uses no instance state
    for k, event in enumerate(parsed):
        idx = first_idx + k
        event.metadata["trace_idx"] = idx
        for call in getattr(event, "tool_calls", None) or []:
            call.metadata["trace_idx"] = idx
    return parsed, running


def prepared_events(events: list[dict[str, Any]], last_call_id: str | None) -> list[dict[str, Any]]:
    """The events with the implicit ``tool_call_id`` of tool outputs made explicit (for storage)."""
    out = []
    running = last_call_id
    for event in events:
        if isinstance(event, dict) and event.get("role") == "tool" and "tool_call_id" not in event:
            event = {**event, "tool_call_id": running}
        if isinstance(event, dict):
            if event.get("role") not in (None, "tool"):
                for call in event.get("tool_calls") or []:
                    running = call.get("id") if isinstance(call, dict) else running
            elif "role" not in event and "type" in event:
                running = event.get("id")
        out.append(event)
    return out


@dataclass
class Element:
    """One node of invariant's dataflow order: an event, or a tool call nested in a message."""

    obj: Any
    kind: str  # the class name invariant selects variables by: Message, ToolCall, ToolOutput, ...
    trace_idx: int
    call_idx: int  # index in the parent message's tool_calls, -1 for a top-level event
    flat: int  # position in the flattened order; a -> b iff flat(a) < flat(b)
    event: Any = None  # the top-level event holding obj
    raw_pos: int = 0  # index of the top-level event in its batch


def flatten(events: list[Any], flat_start: int) -> list[Element]:
    """Elements in the order invariant's ``Dataflow`` adds them (message, then its tool calls)."""
    out: list[Element] = []
    flat = flat_start
    for pos, event in enumerate(events):
        idx = event.metadata["trace_idx"]
        out.append(Element(event, type(event).__name__, idx, -1, flat, event, pos))
        flat += 1
        if type(event) is Message and event.tool_calls is not None:
            for j, call in enumerate(event.tool_calls):
                out.append(Element(call, type(call).__name__, idx, j, flat, event, pos))
                flat += 1
    return out


class Occurrences:
    """Where each object of one event sits, in the order invariant's ``RangeLocator`` visits it.

    invariant reports a marked object at every place the locator meets it (the check precedes
    the visited-set check), so an object may have several (sequence number, path) places.
    """

    def __init__(self, event: Any, trace_idx: int) -> None:
        self.places: dict[int, list[tuple[int, str]]] = {}
        self._seq = 0
        self._visited: set[int] = set()
        self._visit(event, [trace_idx])

    def _visit(self, obj: Any, path: list) -> None:
        self.places.setdefault(id(obj), []).append((self._seq, ".".join(map(str, path))))
        self._seq += 1
        if id(obj) in self._visited:
            return
        self._visited.add(id(obj))
        if type(obj) is dict:
            for k in obj:
                self._visit(obj[k], path + [k])
        elif type(obj) is list:
            for i, v in enumerate(obj):
                self._visit(v, path + [i])
        elif isinstance(obj, Contents):
            for i in range(len(obj.root)):
                self._visit(obj.root[i], path + [i])
        elif isinstance(obj, BaseModel):
            for name in obj.__class__.model_fields:
                self._visit(getattr(obj, name), path + [name])


class EventIndex:
    """Lazily built :class:`Occurrences` of the events an evaluation may mark."""

    def __init__(self) -> None:
        self._by_event: dict[int, tuple[Any, int, Occurrences | None]] = {}

    def add(self, event: Any, trace_idx: int) -> None:
        self._by_event.setdefault(id(event), (event, trace_idx, None))

    def locate(self, obj_id: int) -> list[tuple[int, int, str]]:
        """(trace index, sequence number, path) of every place ``obj_id`` has in a known event."""
        found = []
        for key, (event, idx, occ) in list(self._by_event.items()):
            if occ is None:
                occ = Occurrences(event, idx)
                self._by_event[key] = (event, idx, occ)
            for seq, path in occ.places.get(obj_id, ()):
                found.append((idx, seq, path))
        return found


class DirectContext(EvaluationContext):
    """An evaluation context that calls functions directly.

    invariant's function cache keys objects by ``id()``, which is wrong once events are rebuilt
    (see the notes); the incremental engine caches per event itself, so no cache is needed here.
    Flow, quantifiers over the input and policy parameters never reach this context: the
    compiler sends rules using them to the reference engine.
    """

    def __init__(self, symbol_table: Any) -> None:
        super().__init__(symbol_table=symbol_table)

    async def acall_function(self, function, *args, **kwargs):  # type: ignore[override]
        return await call_either_way(function, *args, **kwargs)

    def get_input(self) -> Input:
        raise RuntimeError("the incremental engine does not evaluate input-wide constructs")


@dataclass
class Outcome:
    """What one condition gave for one assignment: status, marked ranges, error text."""

    status: str
    marks: list[tuple[int, int, str]] = field(default_factory=list)  # (trace idx, seq, path)
    error: str = ""


async def evaluate(expr: Any, store: dict, globals_: Any, ctx: DirectContext,
                   index: EventIndex) -> Outcome:
    """Evaluate one rule-body expression under ``store`` (VariableDeclaration -> object).

    The status is what invariant's short-circuited rule body makes of the value: ``False`` stops
    the body (F), an exception aborts the whole analysis (R), ``True`` or an assignment's NOP lets
    the body go on (T), anything else lets it go on but keeps it from ever being ``True`` (X).
    """
    token = INTERPRETER_STACK.set([])  # a private stack: no other evaluation becomes our parent
    try:
        value, ranges = await Interpreter.eval(expr, dict(store), globals_, evaluation_context=ctx,
                                               return_ranges=True)
    except Exception as exc:  # noqa: BLE001 - the reference aborts on any exception
        return Outcome(RAISE, error=f"{type(exc).__name__}: {exc}")
    finally:
        INTERPRETER_STACK.reset(token)
    if value is False:
        return Outcome(FALSE)
    status = TRUE if (value is True or value is NOP) else OTHER
    marks = []
    for r in ranges:
        suffix = f":{r.start}-{r.end}" if r.start is not None and r.end is not None else ""
        for idx, seq, path in index.locate(int(r.object_id)):
            marks.append((idx, seq, path + suffix))
    return Outcome(status, marks)


async def evaluate_value(expr: Any, store: dict, globals_: Any, ctx: DirectContext) -> Any:
    """Evaluate an expression to its value (e.g. a raise's ``PolicyViolation(...)``)."""
    token = INTERPRETER_STACK.set([])
    try:
        return await Interpreter.eval(expr, dict(store), globals_, evaluation_context=ctx,
                                      partial=False)
    finally:
        INTERPRETER_STACK.reset(token)


def object_place(element: Element, index: EventIndex) -> list[tuple[int, int, str]]:
    """Where invariant locates a bound variable's own object (``messages.2.tool_calls.0``)."""
    index.add(element.event, element.trace_idx)
    return index.locate(id(element.obj))


__all__ = ["Element", "EventIndex", "DirectContext", "Outcome", "Occurrences", "evaluate",
           "evaluate_value", "flatten", "object_place", "parse_batch", "prepared_events",
           "TRUE", "FALSE", "RAISE", "OTHER", "ToolCall", "ToolOutput", "Message"]
