"""Replay on awkward input: sessions split over files, text json takes but no report can carry,
records the worker rejects, verdicts over the violation cap, what verify must notice, and the
CLI's answers to bad flags and paths. The worker's own Evaluator is the oracle where it decides."""

from __future__ import annotations

import asyncio
import doctest
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_replay import ROOT, SEND_RULE, batches, call, record, replay, user

import monitor.core
import monitor.models
import monitor.policy
import monitor.replay
import monitor.replay.evaluate
import monitor.replay.evidence
import monitor.replay.sources
import monitor.replay.spool
import monitor.replay.tally
import monitor.report
import monitor.samples
import monitor.state
from monitor.config import WorkerSettings
from monitor.core import LONE_SURROGATE, BatchEvaluator, Rejected, decode_batch
from monitor.policy import load_policy_set
from monitor.replay import ReplayRequest, run_replay, verify_report
from monitor.report import Report
from monitor.state import SessionStore


@pytest.fixture
def send_policy(tmp_path):
    p = tmp_path / "send.gr"
    p.write_text(SEND_RULE)
    return p


def cli(*args: str):
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_doc_examples_of_replay_and_what_it_builds_on_run():
    for module in (monitor.replay, monitor.replay.sources, monitor.replay.evaluate, monitor.replay.spool,
                   monitor.replay.tally, monitor.replay.evidence, monitor.report, monitor.core, monitor.state,
                   monitor.models, monitor.policy, monitor.samples):
        failed, tried = doctest.testmod(module)
        assert failed == 0 and tried > 0, module.__name__


def test_files_sharing_a_name_are_two_sessions_and_a_session_id_goes_on_across_files(tmp_path, send_policy,
                                                                                       monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "s.json").write_text(json.dumps([user("hello")]))
    (b / "s.json").write_text(json.dumps([user("send it"), call("send_email")]))
    report, _ = replay(tmp_path, [a / "s.json", b / "s.json"], send_policy)
    assert sorted(s.session_id for s in report.sessions) == sorted(["s", (b / "s").as_posix()])
    assert [x.decision for x in batches(report, (b / "s").as_posix())] == ["allow", "deny"]
    assert report.manifest.counts.duplicates == 0
    # a/s.json takes "s", c/b/s.json inside folder c takes "b/s", so b/s.json gets neither; and a
    # file named twice (through its folder and by itself) is read once
    (tmp_path / "c" / "b").mkdir(parents=True)
    (tmp_path / "c" / "b" / "s.json").write_text(json.dumps([user("hi")]))
    monkeypatch.chdir(tmp_path)
    report, _ = replay(tmp_path, ["a/s.json", "c", "b/s.json", "c/b/s.json"], send_policy, name="n.json")
    assert [(s.session_id, len(s.batches)) for s in report.sessions] == [("b/s", 1), ("b/s#2", 2), ("s", 1)]
    assert [f.path for f in report.manifest.inputs.files] == ["a/s.json", "c/b/s.json", "b/s.json"]

    # one session in two files: the keyword in the first, the call in the second
    (a / "day1.json").write_text(json.dumps({"session_id": "X", "events": [user("send it"), user("ok")]}))
    (b / "day2.json").write_text(json.dumps({"session_id": "X", "events": [call("send_email")]}))
    report, _ = replay(tmp_path, [a / "day1.json", b / "day2.json"], send_policy, name="x.json")
    got = batches(report, "X")
    assert [(x.batch_id, x.seq, x.decision, x.duplicate) for x in got] == [
        ("0", 0, "allow", False), ("1", 1, "allow", False), ("2", 2, "deny", False)]
    assert verify_report(tmp_path / "x.json").ok


def test_text_that_json_accepts_but_no_report_can_carry_is_bad_input_and_the_rest_goes_on(tmp_path, send_policy):
    f = tmp_path / "t.jsonl"
    lines = [
        b"\xef\xbb\xbf" + record("bom", "1", [user("send it")]).encode(),  # a BOM: json reads it
        record("bom", "2", [call("send_email")]).encode(),
        b'{"session_id": "sur", "batch_id": "1", "events": [{"role": "user", "content": "hi \\ud83d"}]}',
        record("sur", "2", [user("hello")]).encode(),
        b'{"session_id": "bad\\ud800", "batch_id": "1", "events": [{"role": "user", "content": "hi"}]}',
    ]
    f.write_bytes(b"\n".join(lines) + b"\n")
    report, _ = replay(tmp_path, [f], send_policy, html=str(tmp_path / "r.html"))
    assert [(x.batch_id, x.decision) for x in batches(report, "bom")] == [("1", "allow"), ("2", "deny")]
    # the denied session's evidence is read back from the BOM line
    assert "send it" in [e.text for e in batches(report, "bom")[1].evidence]
    assert [(b.line, b.reason) for b in report.bad_input] == [(3, LONE_SURROGATE), (5, LONE_SURROGATE)]
    # the first has readable ids: the worker's deny; the second's session id is the bad text itself
    sur = batches(report, "sur")
    assert [(x.decision, x.reason is not None) for x in sur] == [("deny", True), ("allow", False)]
    assert "bad" not in "".join(s.session_id for s in report.sessions)

    t = tmp_path / "trace.json"
    t.write_bytes(b'[{"role": "user", "content": "send \\udc00"}, {"role": "user", "content": "fine"}]')
    report, _ = replay(tmp_path, [t], send_policy, name="t.json")
    assert [b.where for b in report.bad_input] == [f"{t}#events[0]"]
    assert [x.decision for x in batches(report, "trace")] == ["allow"]


def test_a_malformed_event_in_a_plain_trace_loses_only_itself(tmp_path, send_policy):
    t = tmp_path / "t.json"
    t.write_text(json.dumps([user("please send"), {"type": "weird", "content": "?"}, call("send_email")]))
    report, _ = replay(tmp_path, [t], send_policy)
    assert [b.where for b in report.bad_input] == [f"{t}#events[1]"]
    assert [x.decision for x in batches(report, "t")] == ["allow", "deny"]


def test_jsonl_in_a_json_file_says_what_it_probably_is(tmp_path, send_policy):
    t = tmp_path / "t.json"
    t.write_text(record("a", "1", [user("x")]) + "\n" + record("a", "2", [user("y")]) + "\n")
    report, _ = replay(tmp_path, [t], send_policy)
    [bad] = report.bad_input
    assert "Extra data" in bad.reason and ".jsonl" in bad.reason


def test_records_the_worker_rejects_get_the_worker_s_answers(tmp_path, send_policy):
    lines = [
        record("s", "b1", [user("hi")]),
        json.dumps({"session_id": "s", "batch_id": "b1", "events": "not a list"}),  # a known id, broken
        json.dumps({"session_id": "s", "batch_id": "b2", "events": "not a list"}),
        record("s", "b2", [user("please send")]),  # its id has a verdict already: the deny
        record("s", "b3", [call("send_email")]),  # so the keyword never joined the past
    ]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(lines) + "\n")
    report, _ = replay(tmp_path, [f], send_policy, engine="incremental")
    got = [(x.batch_id, x.decision, x.duplicate) for x in batches(report, "s")]

    evaluator = BatchEvaluator(load_policy_set(str(send_policy)), WorkerSettings(policy_path=str(send_policy)))
    store = SessionStore({})

    async def worker() -> list:
        out = []
        for line in lines:
            try:
                got_ = await evaluator.evaluate(store, decode_batch(b"s", line.encode(), 10**6), None)
            except Rejected as rej:
                got_ = await evaluator.reject(store, rej, None)
            verdict, new = got_.verdict, got_.new
            out.append((verdict.batch_id, verdict.decision, not new))
        return out

    assert got == asyncio.run(worker())
    assert got == [("b1", "allow", False), ("b1", "allow", True), ("b2", "deny", False),
                   ("b2", "deny", True), ("b3", "allow", False)]


def test_violations_past_the_verdict_cap_are_all_in_the_report(tmp_path):
    policy = tmp_path / "a.gr"
    # three rules, each within the per-rule cap (100), together past the verdict's cap (200)
    policy.write_text("".join(f'raise "has {c}" if:\n    (m: Message)\n    "{c}" in m.content\n\n' for c in "abc"))
    t = tmp_path / "t.json"
    t.write_text(json.dumps([user(f"{'abc'[i // 100]}{i}") for i in range(250)]))
    report, _ = replay(tmp_path, [t], policy, engine="incremental", trace_batch=1000)
    [b] = batches(report, "t")
    assert len(b.violations) == 250 > WorkerSettings.model_fields["max_verdict_violations"].default
    assert len({v.alert_id for v in b.violations}) == 250
    assert [r.violations for r in report.totals.rules] == [100, 100, 50]


def test_a_fan_out_past_the_rule_cap_is_one_summary_in_the_report(tmp_path):
    policy = tmp_path / "a.gr"
    policy.write_text('raise "has a" if:\n    (m: Message)\n    "a" in m.content\n')
    t = tmp_path / "t.json"
    t.write_text(json.dumps([user(f"a{i}") for i in range(250)]))
    report, _ = replay(tmp_path, [t], policy, engine="incremental", trace_batch=1000)
    [b] = batches(report, "t")
    cap = WorkerSettings.model_fields["max_rule_matches"].default
    assert b.decision == "deny" and len(b.violations) == cap + 1
    assert "matching stopped after 100" in b.violations[-1].message


def test_verify_notices_every_doctored_field_and_a_policy_folder_that_grew(tmp_path):
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "examples" / "policies", policies)
    out = tmp_path / "r.json"
    run_replay(ReplayRequest(inputs=[str(ROOT / "examples" / "sessions")], policy=str(policies), out=str(out),
                             progress=False))
    assert verify_report(out).ok
    text = out.read_text()
    for name, old, new, expect in [
        # (sessions are written one per line, compact; the head is spaced)
        ("severity", '"severity":"medium"', '"severity":"low"', "violations differ"),
        ("message", '"message":"Secret in bash command', '"message":"A secret in bash command',
         "violations differ"),
        ("totals", '"sessions_denied": 8', '"sessions_denied": 0', "the totals differ: sessions_denied"),
        ("session", '"denied":3', '"denied":2', "denied differ"),
    ]:
        assert old in text, old
        doctored = tmp_path / f"{name}.json"
        head, _, tail = text.rpartition(old)  # the last: in a session, after the totals
        doctored.write_text(head + new + tail)
        res = verify_report(doctored)
        assert not res.ok and any(expect in p for p in res.problems), (name, res.problems)
    (policies / "extra.gr").write_text('raise "x" if:\n    (m: Message)\n    "zzz" in m.content\n')
    res = verify_report(out)
    assert not res.ok and any("added" in p and "extra.gr" in p for p in res.problems), res.problems


def test_cli_summary_shows_data_as_text_and_bad_flags_and_paths_say_what_is_expected(tmp_path, send_policy):
    f = tmp_path / "m.jsonl"
    f.write_text(record("[/oops]", "1", [user("send")]) + "\n" + record("[/oops]", "2", [call("send_email")]) + "\n")
    other = tmp_path / "o.gr"
    other.write_text('raise "risky [risk=medium]" if:\n    (t: ToolCall)\n    t is tool:delete_all\n')
    run = cli("replay", str(f), "--policy", str(send_policy), "--compare", str(other), "-o", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    assert "1 sessions change verdict" in run.stderr and "[/oops]" in run.stderr, run.stderr
    other.write_text(other.read_text().replace("delete_all", "send_email"))
    run = cli("replay", str(f), "--policy", str(other), "-o", str(tmp_path / "r2.json"))
    assert run.returncode == 0 and "risky [risk=medium]" in run.stderr, run.stderr

    for flag, value, expected in [("--from-offset", "0:1,2", "P:N,P:N"), ("--partitions", "a", "0,3"),
                                  ("--to-time", "yesterday", "ISO time")]:
        run = cli("replay", "--prefix", "agent", "--policy", str(send_policy), flag, value)
        assert run.returncode == 2 and flag in run.stderr and expected in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    run = cli("replay", str(empty), "--policy", str(send_policy), "-o", str(tmp_path / "e.json"))
    assert run.returncode == 2 and "no trace files" in run.stderr, run.stderr
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    run = cli("replay", str(f), "--policy", str(send_policy), "-o", str(blocker / "r.json"))
    assert run.returncode == 2 and f"cannot write {blocker / 'r.json'}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_bad_eventbatch_in_a_json_file_is_denied_like_a_bad_jsonl_line(tmp_path, send_policy):
    good = json.loads(record("s", "1", [user("hi")]))
    bad = {"session_id": "s", "batch_id": "2", "events": "not a list"}
    anonymous = {"batch_id": "3", "events": []}
    (tmp_path / "b.json").write_text(json.dumps([good, bad, anonymous]))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in (good, bad, anonymous)) + "\n")
    for name in ("b.json", "b.jsonl"):
        report, _ = replay(tmp_path, [tmp_path / name], send_policy, name=f"{name}.report")
        got = [(x.batch_id, x.decision, (x.reason or "").split(":")[0]) for x in batches(report, "s")]
        assert got == [("1", "allow", ""), ("2", "deny", "rejected record (invalid)")], name
        assert len(report.bad_input) == 2, name


def test_surrogates_are_refused_in_sharded_jsonl_and_in_utf16_json(tmp_path, send_policy):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"session_id": "s\\ud800", "batch_id": "1", "events": [{"role": "user", "content": "hi"}]}\n'
                  + record("ok", "1", [user("hi")]).encode() + b"\n")
    for shards in (1, 2):
        report, _ = replay(tmp_path, [f], send_policy, name=f"r{shards}.json", shards=shards)
        assert [b.reason for b in report.bad_input] == [LONE_SURROGATE], shards
        assert [s.session_id for s in report.sessions] == ["ok"]
    t = tmp_path / "u.json"
    t.write_bytes('[{"role": "user", "content": "send \\ud800 it"}, {"role": "user", "content": "hi"}]'
                  .encode("utf-16"))
    report, _ = replay(tmp_path, [t], send_policy, name="u.json")
    assert [(b.where, b.reason) for b in report.bad_input] == [(f"{t}#events[0]", LONE_SURROGATE)]
    assert [x.decision for x in batches(report, "u")] == ["allow"]


def test_a_malformed_event_leaves_the_rest_of_its_batch(tmp_path, send_policy):
    t = tmp_path / "t.json"
    t.write_text(json.dumps([user("please send"), {"role": "user", "content": 5}, call("send_email"), user("x")]))
    report, _ = replay(tmp_path, [t], send_policy, trace_batch=3)
    assert [b.where for b in report.bad_input] == [f"{t}#events[1]"]
    assert [(x.batch_id, x.events, x.decision) for x in batches(report, "t")] == [("0", 2, "deny"), ("1", 1, "allow")]


def test_an_eventbatch_in_a_json_file_is_decoded_as_the_same_jsonl_line(tmp_path, send_policy):
    big = json.loads(record("s", "1", [user("x" * 3000)]))
    broken = {"session_id": "s", "batch_id": "2", "seq": "x", "events": [{"role": "user", "content": 1}] * 4}
    (tmp_path / "b.json").write_text(json.dumps([big, broken]))
    (tmp_path / "b.jsonl").write_text(json.dumps(big) + "\n" + json.dumps(broken) + "\n")
    reasons = {}
    for name in ("b.json", "b.jsonl"):
        report, _ = replay(tmp_path, [tmp_path / name], send_policy, name=f"{name}.report", max_record_bytes=2000)
        reasons[name] = [b.reason.split(" bytes")[0].rsplit(" ", 1)[0] for b in report.bad_input]
        assert [x.decision for x in batches(report, "s")] == ["deny", "deny"], name
    assert reasons["b.json"] == reasons["b.jsonl"] and reasons["b.json"][0] == "the record is"


def test_verify_notices_a_changed_bad_input_reason(tmp_path, send_policy):
    f = tmp_path / "t.jsonl"
    f.write_text(record("s", "1", [user("hi")]) + "\n{broken\n")
    replay(tmp_path, [f], send_policy)
    out = tmp_path / "report.json"
    report = Report.load(out)
    doctored = tmp_path / "doctored.json"
    doctored.write_text(out.read_text().replace(report.bad_input[0].reason, "something else"))
    res = verify_report(doctored)
    assert not res.ok and res.problems == ["the bad input listed differs"]


def test_a_report_path_that_is_a_folder_and_repeated_offsets_are_refused(tmp_path, send_policy):
    f = tmp_path / "t.jsonl"
    f.write_text(record("s", "1", [user("hi")]) + "\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(monitor.replay.ReplayError, match="is a directory"):
        run_replay(ReplayRequest(inputs=[str(f)], policy=str(send_policy), out=str(tmp_path / "out"),
                                 progress=False))
    for value in ("0:1,0:2", "-1:5"):
        run = cli("replay", "--prefix", "agent", "--policy", str(send_policy), f"--from-offset={value}")
        assert run.returncode == 2 and "each partition once" in run.stderr, run.stderr


def test_the_worker_refuses_a_lone_surrogate_with_its_ids_and_takes_a_bom():
    value = b'{"session_id": "s", "batch_id": "b", "events": [{"role": "user", "content": "hi \\ud800"}]}'
    with pytest.raises(Rejected) as err:
        decode_batch(b"s", value, 10**6)
    assert (err.value.kind, err.value.reason, err.value.session_id, err.value.batch_id) == (
        "invalid", LONE_SURROGATE, "s", "b")
    ok = decode_batch(b"s", b"\xef\xbb\xbf" + value.replace(b" \\ud800", b""), 10**6)
    assert ok.trace() == [{"role": "user", "content": "hi"}]
    # a pair is one character, not a lone surrogate
    pair = decode_batch(b"s", value.replace(b"\\ud800", b"\\ud83d\\ude00"), 10**6)
    assert pair.trace()[0]["content"] == "hi \U0001f600"


def test_raw_surrogate_bytes_deep_nesting_and_odd_file_names_are_bad_input_not_a_crash(tmp_path, send_policy):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "raw.json").write_bytes(b'[{"role": "user", "content": "send \xed\xa0\x80 it"}, '
                                 + json.dumps(call("send_email")).encode() + b"]")
    (d / "deep.json").write_text("[" * 5000 + "]" * 5000)
    (d / "lines.jsonl").write_text("[" * 5000 + "]" * 5000 + "\n" + record("ok", "1", [user("hi")]) + "\n")
    odd = os.fsdecode(b"caf\xe9.json")  # a name that is not UTF-8 (a Latin-1 file system's)
    (d / odd).write_text(json.dumps([user("hi")]))
    # one file under two spellings is read once
    report, _ = replay(tmp_path, [d, d / "sub" / ".." / "lines.jsonl"], send_policy)
    reasons = {b.where.rsplit("/", 1)[-1]: b.reason for b in report.bad_input}
    assert reasons == {"caf\\xe9.json": "the file name is not UTF-8: rename it",
                       "deep.json": "not JSON we can read: it is nested too deeply",
                       "lines.jsonl:1": "the record value is not JSON: it is nested too deeply",
                       "raw.json#events[0]": LONE_SURROGATE}
    assert [s.session_id for s in report.sessions] == ["ok", "raw"]
    assert [x.decision for x in batches(report, "raw")] == ["allow"]
    assert verify_report(tmp_path / "report.json").ok


def test_a_report_written_into_an_input_folder_is_no_input(tmp_path, send_policy):
    d = tmp_path / "traces"
    d.mkdir()
    (d / "t.json").write_text(json.dumps([user("send"), call("send_email")]))
    for _ in range(2):  # the second run finds the first one's report among the traces
        run_replay(ReplayRequest(inputs=[str(d)], policy=str(send_policy), out=str(d / "audit.json"),
                                 html=str(d / "audit.html"), progress=False))
        report = Report.load(d / "audit.json")
        assert [f.path for f in report.manifest.inputs.files] == [str(d / "t.json")]
        assert report.bad_input == []
    assert verify_report(d / "audit.json").ok


def test_cli_refuses_a_record_limit_below_the_worker_s_and_no_shards(tmp_path, send_policy):
    for flag, value in [("--max-record-bytes", "10"), ("--shards", "0")]:
        run = cli("replay", str(tmp_path), "--policy", str(send_policy), flag, value)
        assert run.returncode == 2 and flag in run.stderr and "expected a whole number >=" in run.stderr, run.stderr
