"""Evidence: the text behind each address of a violation (``messages.3.content:7-11``), read back
from the spooled records of a denied session, so that a report shows what a rule matched."""

from __future__ import annotations

import json
from typing import Any

from monitor.core import decode_batch
from monitor.report import TEXT_LIMIT, BatchResult, Evidence


def _walk(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, str):
            try:
                value = json.loads(value)  # tool-call arguments may be a JSON string
            except ValueError:
                return None
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def evidence_for(address: str, past: list[dict[str, Any]], pending: list[dict[str, Any]],
                 start: int) -> Evidence | None:
    """The text behind ``messages.N.field:a-b`` in a session whose past is ``past``.

    >>> evidence_for("messages.0.content:7-11", [], [{"role": "user", "content": "please send"}], 0).text
    'please send'
    """
    body, _, span = address.partition(":")
    parts = body.split(".")
    if len(parts) < 2 or parts[0] != "messages" or not parts[1].isdigit():
        return None
    n = int(parts[1])
    if n < start:
        event = past[n] if n < len(past) else None
    else:
        event = pending[n - start] if n - start < len(pending) else None
    if not isinstance(event, dict):
        return None
    value = _walk(event, parts[2:])
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    s = e = None
    if span and "-" in span:
        a, _, b = span.partition("-")
        if a.isdigit() and b.isdigit():
            s, e = int(a), int(b)
    limit = max(TEXT_LIMIT, (e or 0) + 200)
    return Evidence(address=address, event=n, role=event.get("role") or ("tool_call" if "function" in event else None),
                    field=".".join(parts[2:]), text=text[:limit], start=s, end=e, truncated=len(text) > limit)


def trace_of(raw: bytes | None) -> list[dict[str, Any]]:
    """The events of a spooled record: a trace's JSON list, or an EventBatch record's events."""
    if not raw:
        return []
    if raw[:1] == b"[":
        return json.loads(raw)
    # as it was decoded when it was evaluated (a BOM, say, passes there)
    return decode_batch(None, raw, len(raw), keyed=False).trace()


def with_evidence(rows: list[tuple[Any, ...]]) -> list[BatchResult]:
    """Results of a denied session with the text of every address, read back from the spool."""
    past: dict[str | None, list[dict[str, Any]]] = {}
    out = []
    for _ord, joined, result, raw in rows:
        res = BatchResult.model_validate_json(result)
        pending = trace_of(raw)
        trace = past.setdefault(res.policy_id, [])
        if res.violations and not res.duplicate:
            ev = []
            for v in res.violations:
                for addr in v.addresses:
                    e = evidence_for(addr, trace, pending, res.start)
                    if e is not None and e not in ev:
                        ev.append(e)
            res.evidence = ev
        if joined:
            trace.extend(pending)
        out.append(res)
    return out

