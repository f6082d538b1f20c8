"""Replay from files: grouping, the worker's decision rules, bad input, reports, verify, compare."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.replay import ReplayRequest, run_replay, verify_report
from monitor.report import Report, strip_volatile

ROOT = Path(__file__).resolve().parents[2]

SEND_RULE = '''raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''

DANGER_RULES = '''raise "dangerous tool [risk=medium]" if:
    (t: ToolCall)
    t is tool:delete_all

raise "send after dangerous tool" if:
    (a: ToolCall) -> (b: ToolCall)
    a is tool:delete_all
    b is tool:send_email
'''


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def call(name: str, cid: str = "1", **args) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}]}


def record(session: str, batch: str, events: list[dict], seq: int | None = None, **kw) -> str:
    return json.dumps({"session_id": session, "batch_id": batch, "seq": seq, "events": events, **kw})


@pytest.fixture
def send_policy(tmp_path: Path) -> Path:
    p = tmp_path / "send.gr"
    p.write_text(SEND_RULE)
    return p


def replay(tmp_path: Path, inputs: list, policy: Path, **kw) -> tuple[Report, object]:
    out = tmp_path / kw.pop("name", "report.json")
    kw.setdefault("engine", "reference")
    res = run_replay(ReplayRequest(inputs=[str(i) for i in inputs], policy=str(policy), out=str(out),
                                   progress=False, **kw))
    return Report.load(out), res


def batches(report: Report, session: str) -> list:
    [s] = [s for s in report.sessions if s.session_id == session]
    return s.batches


def test_plain_trace_is_one_session_checked_event_by_event(tmp_path, send_policy):
    trace = tmp_path / "incident-42.json"
    trace.write_text(json.dumps([user("please send the report to Peter"), {"role": "assistant", "content": "ok"},
                                 call("send_email", to="peter@example.com")]))
    report, _ = replay(tmp_path, [trace], send_policy)
    [s] = report.sessions
    assert s.session_id == "incident-42" and s.decision == "deny"
    assert [b.decision for b in s.batches] == ["allow", "allow", "deny"]
    [v] = s.batches[2].violations
    assert v.message == "Must not call tool after user uses keyword"
    assert v.addresses == ["messages.0", "messages.0.content:7-11", "messages.2.tool_calls.0"]
    # evidence resolves addresses into the past (message 0) and the pending batch (message 2)
    ev = {e.address: e for e in s.batches[2].evidence}
    span = ev["messages.0.content:7-11"]
    assert span.text[span.start:span.end] == "send" and span.role == "user"
    assert "send_email" in ev["messages.2.tool_calls.0"].text
    assert report.totals.decisions == {"allow": 2, "deny": 1}
    assert [(r.rule_index, r.violations, r.sessions) for r in report.totals.rules] == [(0, 1, 1)]
    assert s.batches[2].source == f"{trace}#events[2]"


def test_jsonl_interleaved_sessions_stay_in_order_and_bad_lines_are_listed(tmp_path, send_policy):
    f = tmp_path / "day.jsonl"
    f.write_text("\n".join([
        record("b", "1", [user("hello")]),
        record("a", "1", [user("send it")]),
        "{not json",
        record("b", "2", [call("send_email")]),
        json.dumps({"session_id": "c", "batch_id": "1", "events": []}),  # no events: invalid
        record("a", "2", [call("send_email")]),
        "",
        record("a", "3", [call("read_file")]),
    ]) + "\n")
    report, res = replay(tmp_path, [f], send_policy)
    assert [s.session_id for s in report.sessions] == ["a", "b", "c"]
    assert [b.decision for b in batches(report, "a")] == ["allow", "deny", "allow"]
    assert [b.decision for b in batches(report, "b")] == ["allow", "allow"]
    # the denied send_email did not join a's past: read_file is message 1, not 2
    assert batches(report, "a")[2].start == 1
    assert [(b.file, b.line) for b in report.bad_input] == [(str(f), 3), (str(f), 5)]
    assert "not JSON" in report.bad_input[0].reason
    assert "events" in report.bad_input[1].reason
    # as the worker does: a refused record whose ids can be read still gets a deny
    [c] = batches(report, "c")
    assert c.decision == "deny" and c.reason.startswith("rejected record (invalid)") and c.events == 0
    assert report.manifest.counts.bad_input == 2 and report.manifest.counts.records == 7
    assert report.totals.sessions == 3 and report.totals.sessions_denied == 2


def test_folder_of_mixed_files_names_sessions_by_relative_path(tmp_path, send_policy):
    d = tmp_path / "traces"
    (d / "team").mkdir(parents=True)
    (d / "team" / "s1.json").write_text(json.dumps([user("send"), call("send_email")]))
    (d / "objs.json").write_text(json.dumps([{"session_id": "o1", "events": [user("hi"), call("send_email")]},
                                            {"session_id": "o2", "events": [user("send"), call("send_email")]}]))
    (d / "recs.jsonl").write_text(record("r1", "x", [user("send"), call("send_email")]) + "\n")
    (d / "broken.json").write_text('[{"role": "user", "content": "x"},')
    (d / "ignored.txt").write_text("not a trace")
    report, _ = replay(tmp_path, [d], send_policy)
    assert [s.session_id for s in report.sessions] == ["o1", "o2", "r1", "team/s1"]
    assert {s.session_id: s.decision for s in report.sessions} == {
        "o1": "allow", "o2": "deny", "r1": "deny", "team/s1": "deny"}
    assert [f.path for f in report.manifest.inputs.files] == [
        str(d / n) for n in ("broken.json", "objs.json", "recs.jsonl", "team/s1.json")]
    [bad] = report.bad_input
    assert bad.file == str(d / "broken.json") and bad.line == 1


@pytest.mark.parametrize("flush", [20_000, 1])  # 1: every remembered verdict is read back from disk
def test_duplicate_batch_repeats_its_verdict_and_does_not_advance(tmp_path, send_policy, monkeypatch, flush):
    from monitor.replay.spool import VerdictSpill

    monkeypatch.setattr(VerdictSpill, "FLUSH", flush)
    f = tmp_path / "dup.jsonl"
    f.write_text("\n".join([
        record("s", "1", [user("send")]),
        record("s", "2", [call("send_email")]),
        record("s", "2", [call("read_file")]),  # redelivery with the same id: same verdict as before
        record("s", "3", [user("ok")]),
    ]) + "\n")
    report, _ = replay(tmp_path, [f], send_policy)
    b = batches(report, "s")
    assert [(x.batch_id, x.decision, x.duplicate) for x in b] == [
        ("1", "allow", False), ("2", "deny", False), ("2", "deny", True), ("3", "allow", False)]
    assert b[2].violations == b[1].violations
    assert b[3].start == 1
    assert report.manifest.counts.duplicates == 1
    assert [(r.violations, r.batches) for r in report.totals.rules] == [(1, 1)]


@pytest.mark.parametrize("keep_denied, expected", [(False, "allow"), (True, "deny")])
def test_denied_batch_joins_the_past_only_with_keep_denied(tmp_path, keep_denied, expected):
    pol = tmp_path / "danger.gr"
    pol.write_text(DANGER_RULES)
    f = tmp_path / "t.json"
    f.write_text(json.dumps([call("delete_all"), call("send_email", cid="2")]))
    report, _ = replay(tmp_path, [f], pol, keep_denied=keep_denied)
    b = batches(report, "t")
    assert b[0].decision == "deny" and b[0].violations[0].severity == "medium"
    assert b[1].decision == expected


def test_policy_errors_and_unknown_policy_ids_deny_with_a_reason(tmp_path):
    d = tmp_path / "policies"
    d.mkdir()
    (d / "length.gr").write_text('raise "long" if:\n    (m: Message)\n    len(m.content) > 3\n')
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([
        record("s", "1", [user("hi")], policy="length"),
        record("s", "2", [call("x")], policy="length"),  # content None: len() raises in the policy
        record("s", "3", [user("hi")], policy="nope"),
    ]) + "\n")
    report, _ = replay(tmp_path, [f], d)
    b = batches(report, "s")
    assert [x.decision for x in b] == ["allow", "deny", "deny"]
    assert b[1].reason.startswith("the policy raised an error: TypeError") and not b[1].violations
    assert "unknown policy 'nope'" in b[2].reason


def test_verdict_memory_forgets_old_batch_ids_like_the_worker(tmp_path, send_policy):
    f = tmp_path / "mem.jsonl"
    f.write_text("\n".join([record("s", "1", [user("send")]), record("s", "2", [user("hi")]),
                            record("s", "3", [user("hi")]), record("s", "1", [call("send_email")])]) + "\n")
    report, _ = replay(tmp_path, [f], send_policy, verdict_memory=2)
    b = batches(report, "s")
    # batch id 1 fell out of the 2 remembered ids: evaluated again, not repeated
    assert [(x.decision, x.duplicate) for x in b] == [("allow", False)] * 3 + [("deny", False)]


def test_out_of_order_seq_is_denied_as_the_worker_does(tmp_path, send_policy):
    f = tmp_path / "seq.jsonl"
    f.write_text("\n".join([record("s", "a", [user("hi")], seq=2), record("s", "b", [user("hi")], seq=1),
                            record("s", "c", [user("hi")], seq=3)]) + "\n")
    report, _ = replay(tmp_path, [f], send_policy)
    b = batches(report, "s")
    assert [x.decision for x in b] == ["allow", "deny", "allow"]
    assert b[1].reason.startswith("out of order: seq 1 arrived after seq 2")
    assert b[2].start == 1


def test_same_input_gives_a_byte_identical_report_but_the_timestamp(tmp_path, send_policy):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(record(f"s{i % 7}", str(i), [user("send") if i % 3 else call("send_email")])
                           for i in range(60)) + "\nbad\n")
    replay(tmp_path, [f], send_policy, name="one.json", html=str(tmp_path / "one.html"))
    replay(tmp_path, [f], send_policy, name="two.json")
    one, two = (tmp_path / "one.json").read_text(), (tmp_path / "two.json").read_text()
    strip = re.compile(r'"created_at": ?"[^"]*"')
    assert strip.sub("", one) == strip.sub("", two)
    assert strip_volatile(one) == strip_volatile(two)
    assert one.count("\n") > 7  # one session per line


def test_verify_passes_then_names_a_tampered_input_file(tmp_path, send_policy):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.json").write_text(json.dumps([user("send"), call("send_email")]))
    (d / "b.jsonl").write_text(record("b", "1", [user("hello")]) + "\n")
    replay(tmp_path, [d], send_policy)
    ok = verify_report(tmp_path / "report.json")
    assert ok.ok, ok.problems
    assert ok.verdicts_checked == 3
    (d / "b.jsonl").write_text(record("b", "1", [user("send")]) + "\n" + record("b", "2", [call("send_email")]) + "\n")
    bad = verify_report(tmp_path / "report.json")
    assert not bad.ok
    assert any(str(d / "b.jsonl") in p and "changed" in p for p in bad.problems), bad.problems
    assert not any("a.json" in p for p in bad.problems)


def test_verify_names_a_changed_policy_and_a_doctored_verdict(tmp_path, send_policy):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([user("send"), call("send_email")]))
    replay(tmp_path, [f], send_policy)
    path = tmp_path / "report.json"
    doctored = path.read_text().replace('"decision":"deny"', '"decision":"allow"')
    (tmp_path / "doctored.json").write_text(doctored)
    res = verify_report(tmp_path / "doctored.json")
    assert not res.ok and any("session t batch #1" in p for p in res.problems), res.problems
    send_policy.write_text(SEND_RULE.replace("send_email", "send_mail"))
    res = verify_report(path)
    assert not res.ok and any(str(send_policy) in p for p in res.problems)


def test_compare_lists_sessions_that_change_verdict_and_why(tmp_path, send_policy):
    other = tmp_path / "other.gr"
    other.write_text(DANGER_RULES)
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join([
        record("keyword", "1", [user("send")]), record("keyword", "2", [call("send_email")]),
        record("danger", "1", [call("delete_all")]),
        record("same", "1", [user("hello")]),
    ]) + "\n")
    report, res = replay(tmp_path, [f], send_policy, compare=str(other))
    c = report.compare
    assert c is not None and c.policy.sha256 == report.manifest.compare_policy.sha256
    got = {ch.session_id: (ch.decision, ch.other_decision) for ch in c.changes}
    assert got == {"danger": ("allow", "deny"), "keyword": ("deny", "allow")}
    assert c.sessions_changed == 2 and c.batches_changed == 2
    [why] = [ch for ch in c.changes if ch.session_id == "danger"][0].batches
    assert why.other_violations == ["dangerous tool [risk=medium] @ messages.0.tool_calls.0"]
    [why] = [ch for ch in c.changes if ch.session_id == "keyword"][0].batches
    assert why.violations[0].startswith("Must not call tool after user uses keyword @ messages.0")
    assert verify_report(tmp_path / "report.json").ok


def test_cli_replay_and_verify(tmp_path, send_policy):
    f = tmp_path / "t.json"
    f.write_text(json.dumps([user("send"), call("send_email")]))
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    # through the project's CLI (monitor.cli loads replay's register_cli hook)
    run = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", str(f), "--policy", str(send_policy),
                          "--engine", "reference", "--out", str(out), "--html", str(html), "--progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "replay summary" in run.stderr and "events/s" in run.stderr
    assert "Must not call tool after user uses keyword" in run.stderr
    assert html.read_text().count('<mark class="hit"') == 1
    manifest = Report.load(out).manifest
    assert manifest.command[:3] == ["agent-monitor", "replay", str(f)]
    assert manifest.versions["invariant-ai"] == "0.3.5"
    assert manifest.policy.sha256 == __import__("hashlib").sha256(SEND_RULE.encode()).hexdigest()
    ok = subprocess.run([sys.executable, "-m", "monitor.cli", "verify", str(out)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    f.write_text(json.dumps([user("hello"), call("send_email")]))
    bad = subprocess.run([sys.executable, "-m", "monitor.replay", "verify", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and str(f) in bad.stdout


def test_sharded_replay_gives_the_same_report(tmp_path, send_policy):
    other = tmp_path / "other.gr"
    other.write_text(DANGER_RULES)
    d = tmp_path / "in"
    d.mkdir()
    lines = []
    for i in range(40):
        sid = f"s{i % 9}"
        ev = [user("send it") if i % 4 == 0 else call("send_email" if i % 3 else "delete_all", cid=str(i))]
        lines.append(record(sid, str(i), ev))
    lines[5] = "{broken"
    lines[9] = json.dumps({"metadata": {"session_id": "decoy"}, "session_id": "s3", "batch_id": "n", "events": []})
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "t.json").write_text(json.dumps([user("send"), call("send_email")]))
    for shards in (1, 2, 3):
        replay(tmp_path, [d], send_policy, name=f"r{shards}.json", shards=shards, compare=str(other))
    one = strip_volatile((tmp_path / "r1.json").read_text())
    assert one["totals"]["decisions"]["deny"] > 5 and one["compare"]["changes"]
    for shards in (2, 3):
        assert strip_volatile((tmp_path / f"r{shards}.json").read_text()) == one


def test_a_rule_counts_each_batch_once_and_shard_tallies_add_up():
    from monitor.models import Violation
    from monitor.replay.tally import Tally
    from monitor.report import BatchResult

    def result(*messages: str) -> BatchResult:
        return BatchResult(batch_id="b", source="x", events=1, start=0, decision="deny", policy_id="p",
                           violations=[Violation(alert_id=f"{m}{i}", rule_index=0 if m == "a" else 1, message=m,
                                                 key=f"{m}{i}") for i, m in enumerate(messages)])

    one, two = Tally(), Tally()
    one.count_rules("s1", result("a", "a", "b"))  # rule a matched twice in one batch
    one.count_rules("s1", result("a"))
    two.count_rules("s2", result("a"))
    assert [(r.message, r.violations, r.batches, r.sessions) for r in one.rule_totals()] == [
        ("a", 3, 2, 1), ("b", 1, 1, 1)]
    merged = Tally.merge([one, two])
    assert [(r.message, r.violations, r.batches, r.sessions) for r in merged.rule_totals()] == [
        ("a", 4, 3, 2), ("b", 1, 1, 1)]
    assert [(r.violations, r.sessions) for r in one.rule_totals()] == [(3, 1), (1, 1)]  # its parts unchanged


def test_unreadable_files_are_listed_and_the_rest_is_replayed(tmp_path, send_policy):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([user("send"), call("send_email")]))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n" + record("x", "1", [user("hi")]).encode() + b"\n")
    missing = tmp_path / "missing.json"
    report, _ = replay(tmp_path, [missing, binary, good], send_policy)
    assert [s.session_id for s in report.sessions] == ["good", "x"]
    assert [(b.file, b.line) for b in report.bad_input] == [(str(binary), 1), (str(missing), None)]
    assert "No such file" in report.bad_input[1].reason
    assert verify_report(tmp_path / "report.json").ok


def test_the_project_sample_sessions_replay_to_their_expected_verdicts(tmp_path):
    samples = ROOT / "examples" / "sessions"
    report, _ = replay(tmp_path, [samples], ROOT / "examples" / "policies", engine="incremental")
    assert report.bad_input == []
    got = {s.session_id: s.batches for s in report.sessions}
    for f in sorted(samples.glob("*.json")):
        sample = json.loads(f.read_text())
        batches_ = got[sample["session_id"]]
        assert [b.batch_id for b in batches_] == [f"{sample['session_id']}:{k}" for k in range(len(sample["batches"]))]
        for b, exp in zip(batches_, sample["expect"], strict=True):
            assert b.decision == exp["decision"], (f.name, b.batch_id)
            assert sorted(v.message for v in b.violations) == sorted(exp.get("violations", [])), (f.name, b.batch_id)
