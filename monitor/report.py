"""Replay reports: JSON models with a provenance manifest, and an HTML rendering for people.

A report is deterministic: sessions sorted by id, batches in the order they were read, and no
timestamp except ``manifest.created_at``. The JSON is written one session per line, so two reports
diff well and a report of 10,000 sessions streams out without being held as one string.

Example::

    >>> from monitor.report import Report, render_html, strip_volatile
    >>> r = Report.empty()
    >>> r.totals.sessions, strip_volatile(r.model_dump_json())["manifest"]["created_at"]
    (0, None)
    >>> "<html" in render_html(r)
    True
"""

from __future__ import annotations

import html
import json
import platform
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from string import Template
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.console import printable
from monitor.models import Decision, Severity, Violation

REPORT_SCHEMA = "agent-monitor/replay-report/1"
TEXT_LIMIT = 4000  # characters of one highlighted field kept in the report


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- manifest


class InputFile(_Model):
    """One file that was read, as it was when it was read."""

    path: str
    sha256: str
    bytes: int


class PartitionRange(_Model):
    """Offsets ``[start, end)`` of one partition, and how many records were read from it."""

    partition: int
    start: int
    end: int
    records: int = 0


class KafkaInput(_Model):
    bootstrap_servers: str
    topic: str
    partitions: list[PartitionRange] = Field(default_factory=list)
    from_time: str | None = None
    to_time: str | None = None


class Inputs(_Model):
    roots: list[str] = Field(default_factory=list, description="the files and folders as given")
    files: list[InputFile] = Field(default_factory=list)
    kafka: KafkaInput | None = None


class PolicyRef(_Model):
    """Which policy ran: where it was loaded from and its exact text's sha256."""

    path: str | None = None
    policy_id: str
    sha256: str
    files: list[InputFile] = Field(default_factory=list)


class ReplayOptions(_Model):
    """Everything besides input and policy that changes a verdict; ``verify`` reuses it."""

    engine: Literal["incremental", "reference"] = "incremental"
    keep_denied: bool = False
    verdict_memory: int = 64
    trace_batch: int = 1
    budget_ms: float | None = None
    max_record_bytes: int = 1_000_000
    allow_imports: list[str] = Field(default_factory=list, description=(
        "imports the policy sandbox allowed beyond invariant's builtins (--allow-import)"))


class Counts(_Model):
    records: int = 0
    batches: int = 0
    duplicates: int = 0
    events: int = 0
    sessions: int = 0
    bad_input: int = 0


class Manifest(_Model):
    """Provenance: enough to re-run the replay and to tell whether its inputs changed."""

    created_at: str | None = None
    command: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    engine: str = ""
    policy: PolicyRef | None = None
    compare_policy: PolicyRef | None = None
    options: ReplayOptions = Field(default_factory=ReplayOptions)
    inputs: Inputs = Field(default_factory=Inputs)
    counts: Counts = Field(default_factory=Counts)


# ---------------------------------------------------------------------------- results


class Evidence(_Model):
    """The text an address points at, with the character span to highlight (if any)."""

    address: str
    event: int
    role: str | None = None
    field: str = ""
    text: str = ""
    start: int | None = None
    end: int | None = None
    truncated: bool = False


class BatchResult(_Model):
    """The verdict of one batch, as the worker would have given it."""

    batch_id: str
    seq: int | None = None
    source: str = Field(description="file:line, file#item, or topic/partition@offset")
    events: int
    start: int = Field(description="trace index of the batch's first event")
    decision: Decision
    reason: str | None = None
    duplicate: bool = False
    policy_id: str | None = None
    policy_sha256: str | None = None
    violations: list[Violation] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)


class SessionResult(_Model):
    session_id: str
    decision: Decision
    batches_total: int = 0
    events: int = 0
    denied: int = 0
    violations: int = 0
    batches: list[BatchResult] = Field(default_factory=list)


class RuleTotal(_Model):
    policy_id: str | None = None
    rule_index: int
    message: str
    severity: Severity = "high"
    violations: int = 0
    batches: int = 0
    sessions: int = 0


class Totals(_Model):
    sessions: int = 0
    sessions_denied: int = 0
    batches: int = 0
    events: int = 0
    decisions: dict[str, int] = Field(default_factory=lambda: {"allow": 0, "deny": 0})
    rules: list[RuleTotal] = Field(default_factory=list)
    bad_input: int = 0


class BadInput(_Model):
    """An input line or record that could not be replayed, and where it is."""

    where: str
    reason: str
    file: str | None = None
    line: int | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


class BatchChange(_Model):
    batch_id: str
    source: str
    decision: Decision | None
    other_decision: Decision | None
    violations: list[str] = Field(default_factory=list, description="'message @ addresses' lines")
    other_violations: list[str] = Field(default_factory=list)
    reason: str | None = None
    other_reason: str | None = None


class SessionChange(_Model):
    session_id: str
    decision: Decision
    other_decision: Decision
    batches: list[BatchChange] = Field(default_factory=list)

    @property
    def verdict_changed(self) -> bool:
        return self.decision != self.other_decision


class CompareResult(_Model):
    """What a second policy would have decided differently, session by session."""

    policy: PolicyRef
    decisions: dict[str, int] = Field(default_factory=dict, description="the other policy's batch totals")
    sessions_denied: int = 0
    sessions_changed: int = 0
    batches_changed: int = 0
    changes: list[SessionChange] = Field(default_factory=list)


class Report(_Model):
    schema_: str = Field(default=REPORT_SCHEMA, alias="schema")
    manifest: Manifest = Field(default_factory=Manifest)
    totals: Totals = Field(default_factory=Totals)
    bad_input: list[BadInput] = Field(default_factory=list)
    compare: CompareResult | None = None
    sessions: list[SessionResult] = Field(default_factory=list)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @classmethod
    def empty(cls) -> "Report":
        return cls()

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls.model_validate_json(Path(path).read_bytes())


# ---------------------------------------------------------------------------- helpers


def versions() -> dict[str, str]:
    """Versions of what decides a verdict: this package, invariant-ai, pydantic, Python."""
    out = {"python": platform.python_version()}
    for dist in ("agent-monitor", "invariant-ai", "pydantic", "confluent-kafka"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def strip_volatile(report_json: str | bytes) -> dict[str, Any]:
    """The report as a dict without the one field allowed to differ between identical runs.

    >>> strip_volatile('{"manifest": {"created_at": "x"}}')
    {'manifest': {'created_at': None}}
    """
    data = json.loads(report_json)
    data.get("manifest", {})["created_at"] = None
    return data


def violation_line(v: Violation) -> str:
    """``message @ addr1, addr2`` - how a person reads a violation in a table."""
    return f"{v.message} @ {', '.join(v.addresses)}" if v.addresses else v.message


def _dump(model: BaseModel) -> str:
    return model.model_dump_json(by_alias=True)


class SessionText(str):
    """A session of the report already rendered as JSON (see :func:`session_text`)."""


def session_text(session: SessionResult, batches: list[str]) -> SessionText:
    """``session`` with ``batches`` given as their JSON texts (``BatchResult.model_dump_json
    (by_alias=True)``), rendered exactly as :func:`_dump` renders the whole session: a replay
    spools its results as text, and splicing them costs a fraction of parsing and dumping.

    >>> b = BatchResult(batch_id="b", source="f:1", events=1, start=0, decision="allow")
    >>> s = SessionResult(session_id="s", decision="allow", batches=[b, b])
    >>> session_text(s.model_copy(update={"batches": []}), [_dump(b)] * 2) == _dump(s)
    True
    """
    if session.batches:
        raise ValueError("the batches are given as texts")
    head = _dump(session)
    assert head.endswith('"batches":[]}')  # noqa: S101 - batches is the last field
    return SessionText(head[:-2] + ",".join(batches) + "]}")


def write_report(out: IO[str], head: Report, sessions: Iterable[SessionResult | SessionText]) -> int:
    """Write ``head`` (without sessions) then each session on a line of its own; returns the count.

    The result parses as one JSON document (``Report.load``).
    """
    data = head.model_dump(mode="json", by_alias=True, exclude={"sessions"})
    out.write("{")
    for key in ("schema", "manifest", "totals", "bad_input", "compare"):
        out.write(json.dumps(key) + ": " + json.dumps(data[key], ensure_ascii=False) + ",\n")
    out.write('"sessions": [')
    n = 0
    for s in sessions:
        out.write(("\n" if n == 0 else ",\n") + (s if isinstance(s, SessionText) else _dump(s)))
        n += 1
    out.write("\n]}\n")
    return n


# ---------------------------------------------------------------------------- HTML


def _template() -> Template:
    text = resources.files("monitor").joinpath("templates/report.html").read_text(encoding="utf-8")
    return Template(text)


def _e(value: Any) -> str:
    # agents' text may hold bidi overrides and other invisible controls: shown, never obeyed
    return html.escape(printable(str(value), keep="\n\t"), quote=True)


def highlight(text: str, spans: list[tuple[int, int, str]]) -> str:
    """Escape ``text`` and wrap each ``(start, end, address)`` span in a ``<mark>``.

    Overlapping spans are merged, so the marks never nest.

    >>> highlight("say <send> now", [(5, 9, "messages.0.content:5-9")])
    'say &lt;<mark class="hit" data-address="messages.0.content:5-9">send</mark>&gt; now'
    """
    merged: list[list[Any]] = []
    for start, end, addr in sorted((max(0, s), min(len(text), e), a) for s, e, a in spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][2] += " " + addr
        else:
            merged.append([start, end, addr])
    out, pos = [], 0
    for start, end, addr in merged:
        out.append(_e(text[pos:start]))
        out.append(f'<mark class="hit" data-address="{_e(addr)}">{_e(text[start:end])}</mark>')
        pos = end
    out.append(_e(text[pos:]))
    return "".join(out)


def _evidence_html(evidence: list[Evidence]) -> str:
    # one block per (event, field); all spans of that field highlighted together
    groups: dict[tuple[int, str], list[Evidence]] = {}
    for ev in evidence:
        groups.setdefault((ev.event, ev.field), []).append(ev)
    detailed = {event for event, fld in groups if fld}
    parts = []
    for (event, fld), evs in sorted(groups.items()):
        if not fld and event in detailed:
            continue  # the whole message adds nothing next to the highlighted field of it
        first = evs[0]
        spans = [(e.start, e.end, e.address) for e in evs if e.start is not None and e.end is not None]
        whole = not spans  # an address of a whole event or tool call: the block is the evidence
        body = highlight(first.text, spans) if spans else _e(first.text)
        cls = "event hit-event" if whole else "event"
        addrs = " ".join(e.address for e in evs)
        parts.append(
            f'<div class="{cls}" data-address="{_e(addrs)}">'
            f'<div class="where">messages.{event}{"." + _e(fld) if fld else ""}'
            f' <span class="role">{_e(first.role or "")}</span></div>'
            f'<pre>{body}{" …" if first.truncated else ""}</pre></div>'
        )
    return "".join(parts)


def _batch_html(b: BatchResult) -> str:
    head = (
        f'<div class="batch {b.decision}{" dup" if b.duplicate else ""}" id="b-{_e(b.batch_id)}">'
        f'<span class="badge {b.decision}">{b.decision}</span> '
        f'<b>batch {_e(b.batch_id)}</b>{f" seq {b.seq}" if b.seq is not None else ""} · '
        f'{b.events} event{"s" if b.events != 1 else ""} from messages.{b.start} · '
        f'<span class="src">{_e(b.source)}</span>{" · repeated (duplicate batch id)" if b.duplicate else ""}'
    )
    body = []
    if b.reason:
        body.append(f'<div class="reason">{_e(b.reason)}</div>')
    for v in b.violations:
        body.append(
            f'<div class="violation"><span class="sev {v.severity}">{v.severity}</span> '
            f'{_e(v.message)} <code>{_e(", ".join(v.addresses))}</code></div>'
        )
    if b.evidence:
        body.append(_evidence_html(b.evidence))
    return head + "".join(body) + "</div>"


def _rows(rows: Iterable[Iterable[Any]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)


def render_html(report: Report, max_allowed_sessions: int = 500) -> str:
    """A self-contained page: summary by rule, then a timeline per session.

    Denied sessions get a full timeline with each violating event and span highlighted; allowed
    sessions are listed compactly (the first ``max_allowed_sessions`` of them).
    """
    m, t = report.manifest, report.totals
    summary = _rows([
        ("sessions", t.sessions), ("sessions denied", t.sessions_denied), ("batches", t.batches),
        ("events", t.events), ("allowed batches", t.decisions.get("allow", 0)),
        ("denied batches", t.decisions.get("deny", 0)), ("bad input", t.bad_input),
    ])
    rules = _rows(
        (r.policy_id or "", r.rule_index, r.message, r.severity, r.violations, r.batches, r.sessions)
        for r in t.rules
    ) or '<tr><td colspan="7">no rule matched</td></tr>'
    denied = [s for s in report.sessions if s.decision == "deny"]
    allowed = [s for s in report.sessions if s.decision != "deny"]
    timelines = []
    for s in denied:
        timelines.append(
            f'<section class="session" id="s-{_e(s.session_id)}"><h3>{_e(s.session_id)} '
            f'<span class="badge deny">deny</span></h3><p>{s.batches_total} batches, {s.events} events, '
            f'{s.denied} denied, {s.violations} violations</p>'
            + "".join(_batch_html(b) for b in s.batches) + "</section>"
        )
    allowed_rows = _rows((s.session_id, s.batches_total, s.events) for s in allowed[:max_allowed_sessions])
    more = len(allowed) - max_allowed_sessions
    allowed_html = (
        f"<table><tr><th>session</th><th>batches</th><th>events</th></tr>{allowed_rows}</table>"
        + (f"<p>… and {more} more allowed sessions (see the JSON report)</p>" if more > 0 else "")
    ) if allowed else "<p>none</p>"
    compare_html = ""
    if report.compare is not None:
        c = report.compare
        items = []
        for ch in c.changes:
            lines = "".join(
                f"<tr><td>{_e(b.batch_id)}</td><td>{_e(b.decision)}</td><td>{_e(b.other_decision)}</td>"
                f"<td>{'<br>'.join(_e(x) for x in b.violations) or _e(b.reason or '')}</td>"
                f"<td>{'<br>'.join(_e(x) for x in b.other_violations) or _e(b.other_reason or '')}</td></tr>"
                for b in ch.batches
            )
            items.append(
                f'<h4>{_e(ch.session_id)}: {ch.decision} → {ch.other_decision}</h4>'
                f"<table><tr><th>batch</th><th>this policy</th><th>other policy</th><th>why (this)</th>"
                f"<th>why (other)</th></tr>{lines}</table>"
            )
        compare_html = (
            f'<h2>Compared with policy {_e(c.policy.policy_id)} <code>{_e(c.policy.sha256[:12])}</code></h2>'
            f"<p>{c.sessions_changed} sessions change verdict, {c.batches_changed} batches change decision.</p>"
            + "".join(items)
        )
    bad = _rows((b.where, b.reason) for b in report.bad_input[:1000])
    bad_html = f"<table><tr><th>where</th><th>reason</th></tr>{bad}</table>" if bad else "<p>none</p>"
    inputs = [f"{f.path} sha256:{f.sha256}" for f in m.inputs.files]
    if m.inputs.kafka:
        k = m.inputs.kafka
        inputs += [f"{k.topic}[{p.partition}] offsets {p.start}..{p.end}" for p in k.partitions]
    manifest = _rows([
        ("policy", f"{m.policy.policy_id} sha256:{m.policy.sha256}" if m.policy else ""),
        ("engine", m.engine), ("command", " ".join(m.command)), ("created", m.created_at or ""),
        ("versions", ", ".join(f"{k}={v}" for k, v in sorted(m.versions.items()))),
    ] + [("input", i) for i in inputs])
    return _template().substitute(
        title=_e(f"Replay report: {m.policy.policy_id if m.policy else ''}"),
        summary=summary, rules=rules, compare=compare_html,
        timelines="".join(timelines) or "<p>no session was denied</p>",
        allowed=allowed_html, bad_input=bad_html, manifest=manifest,
    )


def iter_sessions(report: Report) -> Iterator[SessionResult]:
    yield from report.sessions


if __name__ == "__main__":  # pragma: no cover - `python -m monitor.report REPORT.json > out.html`
    sys.stdout.write(render_html(Report.load(sys.argv[1])))
