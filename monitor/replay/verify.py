"""``agent-monitor verify``: re-run a replay report from its manifest and compare; it holds iff the
inputs, the policy and every verdict (with its violations and evidence) are the same."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.replay.request import ReplayRequest
from monitor.replay.run import run_replay
from monitor.report import BatchResult, InputFile, Manifest, Report


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts_checked: int = 0


def _file_problems(files: list[InputFile], what: str) -> list[str]:
    out = []
    for f in files:
        p = Path(f.path)
        if not p.is_file():
            out.append(f"{what} {f.path} is missing")
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != f.sha256:
            out.append(f"{what} {f.path} changed: sha256 {digest} != {f.sha256} in the report")
    return out


def _differing(a: Any, b: Any, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The fields in which two results of one model differ."""
    return [name for name in type(a).model_fields if name not in exclude and getattr(a, name) != getattr(b, name)]


def _batch_line(b: BatchResult | None) -> str:
    if b is None:
        return "nothing"
    return f"{b.decision} with {len(b.violations)} violations" + (f" ({b.reason})" if b.reason else "")


def _result_problems(report: Report, again: Report) -> tuple[list[str], int]:
    """Where a re-run's results differ from a report's: every field of every batch result (the
    verdict, its reason and violations, evidence ...), of every session, and the totals."""
    problems: list[str] = []
    theirs = {(s.session_id, i): b for s in report.sessions for i, b in enumerate(s.batches)}
    ours = {(s.session_id, i): b for s in again.sessions for i, b in enumerate(s.batches)}
    diffs = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    for k in diffs[:20]:
        a, b = theirs.get(k), ours.get(k)
        which = f" ({', '.join(_differing(a, b))} differ)" if a is not None and b is not None else ""
        problems.append(f"session {k[0]} batch #{k[1]}{which}: report has {_batch_line(a)}, "
                        f"re-run gives {_batch_line(b)}")
    if len(diffs) > 20:
        problems.append(f"... and {len(diffs) - 20} more differing verdicts")
    sessions = {s.session_id: s for s in again.sessions}
    for s in report.sessions:
        mine = sessions.get(s.session_id)
        if mine is not None and (fields := _differing(s, mine, frozenset({"batches"}))):
            problems.append(f"session {s.session_id}: {', '.join(fields)} differ")
    if fields := _differing(report.totals, again.totals):
        problems.append(f"the totals differ: {', '.join(fields)}")
    return problems, len(theirs)


def verify_report(path: str | Path, *, bootstrap_servers: str | None = None, workdir: str | None = None,
                  progress: bool = False) -> VerifyResult:
    """Re-run a report from its manifest; ok iff inputs, policy and every verdict are identical."""
    report = Report.load(path)
    m = report.manifest
    if m.policy is None or m.policy.path is None:
        return VerifyResult(False, ["the report's manifest names no policy"])
    problems = _file_problems(m.inputs.files, "input file") + _file_problems(m.policy.files, "policy file")
    if m.compare_policy is not None:
        problems += _file_problems(m.compare_policy.files, "compare policy file")
    if problems:
        return VerifyResult(False, problems)
    with tempfile.TemporaryDirectory(prefix="agent-monitor-verify-", dir=workdir) as tmp:
        req = _rerun_request(m, m.policy.path, os.path.join(tmp, "report.json"), tmp, bootstrap_servers, progress)
        try:
            run_replay(req)
        except Exception as exc:  # noqa: BLE001 - any failure to re-run is a failed verification
            return VerifyResult(False, [f"the replay could not be re-run: {type(exc).__name__}: {exc}"])
        again = Report.load(req.out)
    notes = []
    if again.manifest.engine != m.engine:
        notes.append(f"engine now {again.manifest.engine!r}, report made with {m.engine!r}")
    problems = _input_problems(report, again) + _policy_problems(m, again.manifest)
    found, checked = _result_problems(report, again)
    problems += found
    if report.compare is not None and again.compare is not None:
        if report.compare.model_dump(exclude={"policy"}) != again.compare.model_dump(exclude={"policy"}):
            problems.append("the comparison with the second policy differs")
    return VerifyResult(not problems, problems, notes, verdicts_checked=checked)


def _rerun_request(m: Manifest, policy: str, out: str, workdir: str, bootstrap_servers: str | None,
                   progress: bool) -> ReplayRequest:
    """The replay a manifest describes, writing its report to ``out``."""
    o = m.options
    req = ReplayRequest(
        policy=policy, compare=m.compare_policy.path if m.compare_policy else None,
        out=out, engine=o.engine, keep_denied=o.keep_denied,
        verdict_memory=o.verdict_memory, trace_batch=o.trace_batch, budget_ms=o.budget_ms,
        max_record_bytes=o.max_record_bytes, allow_imports=list(o.allow_imports), progress=progress, command=m.command, workdir=workdir)
    if m.inputs.kafka is not None:
        k = m.inputs.kafka
        req.topic = k.topic
        req.bootstrap_servers = bootstrap_servers or k.bootstrap_servers
        req.partitions = [r.partition for r in k.partitions]
        req.from_offsets = {r.partition: r.start for r in k.partitions}
        req.to_offsets = {r.partition: r.end for r in k.partitions}
    else:
        # the paths as given: a plain trace is named after its path inside the given folder
        req.inputs = list(m.inputs.roots) or [f.path for f in m.inputs.files]
    return req


def _input_problems(report: Report, again: Report) -> list[str]:
    """Whether the re-run read what the report did: the same files or partition records, the
    same counts, the same bad input."""
    problems = []
    m, now = report.manifest, again.manifest
    if m.inputs.kafka is not None and now.inputs.kafka is not None:
        if len(m.inputs.kafka.partitions) != len(now.inputs.kafka.partitions):
            problems.append("the re-run read a different set of partitions")
        for a, b in zip(m.inputs.kafka.partitions, now.inputs.kafka.partitions, strict=False):
            if a.records != b.records:
                problems.append(f"partition {a.partition}: {b.records} records read now, {a.records} in the report")
    elif [f.path for f in now.inputs.files] != [f.path for f in m.inputs.files]:
        problems.append("the re-run read a different set of files")
    for name in ("records", "batches", "events", "sessions", "bad_input"):
        x, y = getattr(m.counts, name), getattr(now.counts, name)
        if x != y:
            problems.append(f"{name}: {y} now, {x} in the report")
    if [(b.where, b.reason) for b in again.bad_input] != [(b.where, b.reason) for b in report.bad_input]:
        problems.append("the bad input listed differs")
    return problems


def _policy_problems(m: Manifest, now: Manifest) -> list[str]:
    """Whether the policies are what they were; a policy folder is what it holds now: a file added
    to it changes the policy."""
    problems = []
    for what, mine, again in (("policy", m.policy, now.policy),
                              ("compare policy", m.compare_policy, now.compare_policy)):
        if mine is None or again is None:
            continue
        if [f.path for f in again.files] != [f.path for f in mine.files]:
            added = sorted({f.path for f in again.files} - {f.path for f in mine.files})
            gone = sorted({f.path for f in mine.files} - {f.path for f in again.files})
            problems.append(f"the {what} {mine.path} holds other files now"
                            + (f"; added: {', '.join(added)}" if added else "")
                            + (f"; gone: {', '.join(gone)}" if gone else ""))
        elif again.sha256 != mine.sha256:
            problems.append(f"the {what} {mine.path} changed: sha256 {again.sha256} != {mine.sha256} in the report")
    return problems
