"""The report of a replay, put together from its shards: their tallies added up, the manifest
(provenance), the comparison with a second policy, and every session's results streamed from the
shards' spools in session order (a denied session's with its evidence)."""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from monitor.policy import PolicySet, policy_files
from monitor.replay.evidence import with_evidence
from monitor.replay.request import ReplayError, ReplayRequest
from monitor.replay.spool import ResultStore
from monitor.replay.tally import ShardSummary, Tally
from monitor.report import (
    CompareResult,
    InputFile,
    Inputs,
    Manifest,
    PolicyRef,
    Report,
    SessionChange,
    SessionResult,
    SessionText,
    Totals,
    now_iso,
    render_html,
    session_text,
    versions,
    write_report,
)


def assemble(req: ReplayRequest, summaries: list[ShardSummary], policies: PolicySet,
             other: PolicySet | None) -> tuple[Report, list[SessionChange]]:
    """Write the report (JSON, and HTML if asked) of shards that have finished; returns its head
    (the report without its sessions) and the sessions whose verdict the compared policy changes."""
    tally = Tally.merge(summaries)
    bad = sorted(tally.bad, key=lambda b: (b.file or b.topic or "", b.partition or 0, b.line or 0, b.offset or 0,
                                           b.where))
    sessions = tally.sessions
    counts = tally.counts
    counts.sessions = len(sessions)
    counts.bad_input = len(bad)
    totals = Totals(
        sessions=len(sessions), sessions_denied=sum(1 for a in sessions.values() if a.denied),
        batches=counts.batches, events=counts.events, decisions=tally.decisions, bad_input=len(bad),
        rules=tally.rule_totals(),
    )
    manifest = Manifest(
        created_at=req.created_at or now_iso(), command=list(req.command), versions=versions(),
        engine=summaries[0].engine, policy=policy_ref(req.policy, policies),
        compare_policy=policy_ref(req.compare, other) if req.compare and other else None,
        options=req.options(), inputs=_inputs(req, summaries[0]), counts=counts,
    )
    stores = [ResultStore.open(s.db) for s in summaries]
    changes: list[SessionChange] = []
    compare = None
    if other is not None and req.compare:
        changes = _changes(tally, stores)
        compare = CompareResult(
            policy=manifest.compare_policy, decisions=tally.other_decisions,  # type: ignore[arg-type]
            sessions_denied=sum(1 for a in sessions.values() if a.other_denied),
            sessions_changed=sum(1 for c in changes if c.verdict_changed),
            batches_changed=tally.batches_changed, changes=changes)
    head = Report(manifest=manifest, totals=totals, bad_input=bad, compare=compare)
    write_atomically(req.out, lambda fh: write_report(fh, head, _session_results(summaries, stores, tally)))
    for st in stores:
        st.close()
    if req.html:
        html = req.html
        write_atomically(html, lambda fh: fh.write(render_html(Report.load(req.out))))
    return head, changes


def _inputs(req: ReplayRequest, first: ShardSummary) -> Inputs:
    """What was read (every shard read all of it): a topic's range with the times as asked (the
    shards were given the offsets those times stand for)."""
    inputs = first.inputs or Inputs()
    if inputs.kafka is not None:
        return Inputs(kafka=inputs.kafka.model_copy(update={"from_time": req.from_time, "to_time": req.to_time}))
    return inputs


def _changes(tally: Tally, stores: list[ResultStore]) -> list[SessionChange]:
    """Per session, the batches whose decision the compared policy changes, in session order."""
    out = []
    for sid, items in heapq.merge(*(st.changes() for st in stores), key=lambda x: x[0]):
        a = tally.sessions[sid]
        out.append(SessionChange(session_id=sid, decision="deny" if a.denied else "allow",
                                 other_decision="deny" if a.other_denied else "allow", batches=items))
    return out


def _session_results(summaries: list[ShardSummary], stores: list[ResultStore],
                     tally: Tally) -> Iterator[SessionResult | SessionText]:
    """Every session's results in session order, merged from the shards' spools."""
    where = {sid: k for k, s in enumerate(summaries) for sid in s.sessions}
    merged = heapq.merge(*(st.session_rows(with_raw=False) for st in stores), key=lambda x: x[0])
    for sid, rows in merged:
        a = tally.sessions[sid]
        if a.denied:
            batches = with_evidence(stores[where[sid]].raw_rows(sid))
            yield SessionResult(session_id=sid, decision="deny", batches_total=len(batches),
                                events=a.events, denied=a.denied, violations=a.violations, batches=batches)
        else:  # the spooled texts as they are: no parsing and dumping again
            yield session_text(SessionResult(
                session_id=sid, decision="allow", batches_total=len(rows), events=a.events,
                denied=a.denied, violations=a.violations), [r[2] for r in rows])


def policy_ref(path: str, ps: PolicySet) -> PolicyRef:
    """A policy as the manifest names it: its path, id, sha256, and every file of it."""
    files = []
    for f in policy_files(path):
        data = f.read_bytes()
        files.append(InputFile(path=str(f), sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    default = ps.default
    assert default is not None  # noqa: S101 - a policy path always loads with its default (load_policy_set)
    return PolicyRef(path=path, policy_id=default.policy_id, sha256=default.sha256, files=files)


def write_atomically(path: str, write: Callable[[IO[str]], Any]) -> None:
    """``write`` to a temporary file beside ``path``, then put it in place: a reader never sees
    half a report, and a failure leaves no temporary file behind."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(path: str) -> None:
    """Refuse a report path that cannot be written, before any work is done."""
    if Path(path).is_dir():
        raise ReplayError(f"cannot write {path}: it is a directory")
    probe = Path(path + ".tmp")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ReplayError(f"cannot write {path}: {exc.strerror or exc}") from None
