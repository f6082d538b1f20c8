"""The command line: argparse errors that say what is expected, exit codes (2 bad input/policy,
3 no broker), policy check/explain, produce and tail against a real broker, every command there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from monitor.cli import main
from monitor.config import TopicNames
from monitor.models import EventBatch, Verdict
from monitor.samples import SampleError, read_batches
from monitor.topics import create_topics

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"
SESSIONS = ROOT / "examples" / "sessions"
from workers import read_messages


def closed_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# -- bad flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["run", "--policy", "p.gr", "--partitions", "0"], "argument --partitions: expected a whole number >= 1, got 0"),
    (["run", "--policy", "p.gr", "--partitions", "many"], "argument --partitions: expected a whole number >= 1, got 'many'"),
    (["run", "--policy", "p.gr", "--budget-ms", "0"], "argument --budget-ms: expected a number > 0, got 0"),
    (["run", "--policy", "p.gr", "--budget-ms", "-5"], "argument --budget-ms: expected a number > 0, got -5"),
    (["run", "--policy", "p.gr", "--metrics-port", "70000"], "argument --metrics-port: expected a TCP port 1-65535"),
    (["run", "--policy", "p.gr", "--guarantee", "twice"], "argument --guarantee: invalid choice: 'twice'"),
    (["run", "--policy", "p.gr", "--session-ttl", "-1"], "argument --session-ttl: expected a number >= 0, got -1"),
    (["run", "--policy", "p.gr", "--commit-interval-ms", "0"], "argument --commit-interval-ms: expected a number > 0"),
    (["run", "--policy", "p.gr", "--engine", "fast"], "argument --engine: invalid choice: 'fast'"),
    (["run", "--policy", "p.gr", "-b", "localhost"], "expected HOST:PORT[,HOST:PORT...], got 'localhost'"),
    (["run"], "one of the arguments --policy --policy-registry is required"),
    (["tail", "everything"], "argument topic: invalid choice: 'everything'"),
    (["tail", "verdicts", "--max", "0"], "argument --max: expected a whole number >= 1, got 0"),
    (["broker", "restart"], "invalid choice: 'restart'"),
    (["topics"], "the following arguments are required: ACTION"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_flags_say_what_is_expected(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(argv, capsys)
    assert expected in err, err
    assert "usage: agent-monitor" in err


# -- policies ---------------------------------------------------------------------------------------

BAD_POLICY = 'raise "x" if:\n    (m: Message)\n    m.content ==\n'


def test_a_policy_that_does_not_parse_exits_2_with_file_and_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.gr"
    bad.write_text(BAD_POLICY)
    # checked before any broker is contacted: the unreachable address is never tried
    assert main(["run", "--policy", str(bad), "-b", closed_address(), "--connect-timeout", "30"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "does not parse" in err
    assert main(["policy", "check", str(bad)]) == 2
    assert f"{bad}:" in capsys.readouterr().err
    # in a folder, the error names the file that is wrong
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "good.gr").write_text((POLICIES / "copyright.gr").read_text())
    (folder / "broken.gr").write_text(BAD_POLICY)
    assert main(["policy", "check", str(folder)]) == 2
    assert str(folder / "broken.gr") in capsys.readouterr().err


def test_a_missing_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--policy", str(tmp_path / "nope.gr")]) == 2
    assert "no such policy file or folder" in capsys.readouterr().err


def test_module_entry_point_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gr"
    bad.write_text(BAD_POLICY)
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "policy", "check", str(bad)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2
    assert f"{bad}:" in proc.stderr and "Traceback" not in proc.stderr


def test_policy_check_reports_every_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    for f in POLICIES.glob("*.gr"):
        assert f"policy id {f.stem}," in out
    assert "(3 rules, policy id secrets_in_code" in out


def test_policy_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "explain", str(POLICIES / "secrets_in_code.gr")]) == 0
    out = capsys.readouterr().out
    # rule messages are printed verbatim (rich markup would swallow "[risk=medium]")
    assert "Secret in python code [risk=medium]" in out
    assert "Secret in assistant message [risk=low]" in out
    assert main(["policy", "explain", str(POLICIES / "multi_turn_flow.gr"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policy_id"] == "multi_turn_flow"
    (rule,) = doc["rules"]
    assert rule["message"] == "Must not send email to Peter after user uses keyword"
    assert rule["engine"] and rule["reason"]
    assert main(["policy", "explain", str(POLICIES / "copyright.gr"), "--engine", "reference", "--json"]) == 0
    (rule,) = json.loads(capsys.readouterr().out)["rules"]
    assert rule["engine"] == "reference" and "reference" in rule["reason"]


# -- produce input ----------------------------------------------------------------------------------

def test_read_batches_formats_and_errors() -> None:
    batches, expect = read_batches((SESSIONS / "flow_send_email_split.json").read_text(), "x.json")
    assert [b.batch_id for b in batches] == ["flow-send-email-split:0", "flow-send-email-split:1"]
    assert expect is not None and [e.decision for e in expect] == ["allow", "deny"]
    listed, none = read_batches(json.dumps([{"session_id": "a", "events": [{"role": "user"}]}] * 2))
    assert len(listed) == 2 and none is None and listed[0].batch_id != listed[1].batch_id
    with pytest.raises(SampleError, match=r"in\.jsonl:2: not JSON"):
        read_batches('{"session_id": "a", "events": [{"role": "user"}]}\n{oops\n', "in.jsonl")
    with pytest.raises(SampleError, match=r"in\.jsonl:3: not an EventBatch: events"):
        read_batches('{"session_id": "a", "events": [{"role": "user"}]}\n\n{"session_id": "b"}\n', "in.jsonl")
    with pytest.raises(SampleError, match="no input"):
        read_batches("  \n", "<stdin>")


def test_bad_produce_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text('{"session_id": "a", "events": [{"role": "robot"}]}\n')
    # input is checked before the broker: no connection is attempted
    assert main(["produce", str(f), "-b", closed_address()]) == 2
    err = capsys.readouterr().err
    assert f"{f}: not an EventBatch: events.0.message.role: Input should be" in err
    assert main(["produce", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


# -- unreachable broker -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["tail", "verdicts"],
    ["topics", "create"],
    ["produce", str(SESSIONS / "flow_send_email.json")],
    ["run", "--policy", str(POLICIES / "copyright.gr")],
])
def test_unreachable_broker_exits_3(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    address = closed_address()
    start = time.monotonic()
    assert main([*argv, "--bootstrap-servers", address, "--connect-timeout", "1"]) == 3
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert address in err
    assert "agent-monitor broker start" in err and "KAFKA_BOOTSTRAP_SERVERS" in err
    assert "Traceback" not in err


# -- against a real broker --------------------------------------------------------------------------

@pytest.fixture
def topics(kafka_bootstrap: str, topic_prefix: str) -> TopicNames:
    create_topics(kafka_bootstrap, topic_prefix, partitions_override=3)
    return TopicNames.for_prefix(topic_prefix)




def test_produce_jsonl_lands_records(kafka_bootstrap: str, topics: TopicNames, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "batches.jsonl"
    f.write_text(textwrap.dedent("""\
        {"session_id": "s1", "batch_id": "b1", "seq": 0, "events": [{"role": "user", "content": "hi"}]}
        # comments and blank lines are skipped

        {"session_id": "s1", "batch_id": "b2", "seq": 1, "events": [{"role": "assistant", "content": "hello"}]}
        {"session_id": "s2", "events": [{"id": "1", "type": "function", "function": {"name": "ls", "arguments": {}}}]}
    """))
    assert main(["produce", str(f), "-b", kafka_bootstrap, "--prefix", topics.prefix, "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["session_id"] for p in printed] == ["s1", "s1", "s2"]
    records = read_messages(kafka_bootstrap, topics.events, 3)
    batches = [EventBatch.model_validate_json(m.value()) for m in records]
    assert {"b1", "b2"} <= {b.batch_id for b in batches}
    assert {m.key() for m in records} == {b"s1", b"s2"}
    assert [b.seq for b in batches if b.session_id == "s1"] == [0, 1]
    s2 = next(b for b in batches if b.session_id == "s2")
    assert len(s2.batch_id) == 32 and s2.trace()[0]["function"]["name"] == "ls"


def test_produce_sample_wait_compares_with_expectations(kafka_bootstrap: str, topics: TopicNames,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from workers import FakeResponder  # allows everything that does not say "deny"

    with FakeResponder(kafka_bootstrap, topics):
        code = main(["produce", str(SESSIONS / "flow_send_email_split.json"), "-b", kafka_bootstrap,
                     "--prefix", topics.prefix, "--wait", "--timeout", "30"])
    out, err = capsys.readouterr()
    # the fake allows batch 1, the sample expects deny: the command says so and fails
    assert code == 1
    assert "flow-send-email-split" in out and "ALLOW" in out
    assert "expected deny" in out and "1 verdict(s) differ" in err


def test_tail_prints_typed_records(kafka_bootstrap: str, topics: TopicNames,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(3):
        v = Verdict(session_id=f"s{i}", batch_id=f"b{i}", decision="allow" if i else "deny", reason="why")
        p.produce(topics.verdicts, key=f"s{i}".encode(), value=v.model_dump_json().encode())
    p.produce(topics.verdicts, key=b"junk", value=b"junk")
    assert p.flush(10) == 0
    assert main(["tail", "verdicts", "-b", kafka_bootstrap, "--prefix", topics.prefix, "--from-beginning",
                 "--idle", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    got = sorted((Verdict.model_validate_json(line) for line in out.splitlines()), key=lambda v: v.session_id)
    assert [(v.session_id, v.decision) for v in got] == [("s0", "deny"), ("s1", "allow"), ("s2", "allow")]
    assert "skipped 1 record(s) that are not Verdicts" in err
    assert main(["tail", "verdicts", "-b", kafka_bootstrap, "--prefix", topics.prefix, "--from-beginning",
                 "--max", "1", "--timeout", "20", "--session", "s2"]) == 0
    out = capsys.readouterr().out
    assert "s2" in out and "ALLOW" in out and "s0" not in out


# -- every command -----------------------------------------------------------------------------------

def test_every_command_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "topics", "produce", "tail", "broker", "policy", "demo", "replay", "verify"):
        assert f"    {command} " in out


# -- demo -------------------------------------------------------------------------------------------

def test_demo_plays_samples_and_fails_on_a_wrong_expectation(kafka_bootstrap: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    good = json.loads((SESSIONS / "flow_send_email_split.json").read_text())
    (sessions / "flow_send_email_split.json").write_text(json.dumps(good))  # the live update plays it too
    wrong = json.loads((SESSIONS / "secrets_create_pr.json").read_text())
    wrong["session_id"] = "wrong-expectation"
    wrong["expect"][2] = {"decision": "allow", "violations": []}  # the worker will deny this batch
    (sessions / "wrong.json").write_text(json.dumps(wrong))
    code = main(["demo", "--bootstrap-servers", kafka_bootstrap, "--sessions", str(sessions), "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "agent-monitor worker ready" in out
    assert "✓ flow-send-email-split  #flow-send-email-split:1  DENY" in out
    assert "Must not call tool after user uses keyword" in out
    assert "✗ wrong-expectation  #wrong-expectation:2  DENY" in out
    assert "1 verdict(s) did not match the expectation" in out
    # the live update: the flow begun under v1 ends under v2 (logged), a rollback (v3) denies it again
    assert "✓ flow-send-email-split-live  #flow-send-email-split-live:1  ALLOW  send_after_keyword v2" in out
    assert "logged Must not call tool after user uses keyword [action=log]" in out
    assert "✓ flow-send-email-split-rollback  #flow-send-email-split-rollback:1  DENY  send_after_keyword v3" in out
    # one per violation (the logged one too), read back from the alerts topic
    assert "alerts 4 (expected 4" in out
