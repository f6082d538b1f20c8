"""The registry's records without a broker: what a record is, its signature, what a worker's
follower takes and refuses (signatures, replayed old versions, unsafe policies), the view the
commands read, per-rule actions, key files."""

from __future__ import annotations

import doctest
import hashlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

import monitor.registry
import monitor.shadow
import monitor.signing
from monitor import signing
from monitor.models import PolicyRecord
from monitor.policy import PolicyLoadError, load_policy_text
from monitor.registry import (
    Key,
    RecordRefused,
    RegistryError,
    RegistryFollower,
    RegistryView,
    check_record,
    diff_records,
    parse_action_args,
    prepare_record,
    record_key,
    resolve_actions,
    sign_record,
    version_key,
)

FLOW = ('raise "email after the keyword" if:\n    (m: Message) -> (t: ToolCall)\n    "send" in m.content\n'
        '    t is tool:send_email\n')
OTHER = 'raise "alpha seen [action=log]" if:\n    (m: Message)\n    "alpha" in m.content\n'


def record(text: str = FLOW, version: int = 1, policy_id: str = "p", stage: str = "active", **kw) -> PolicyRecord:
    return PolicyRecord(policy_id=policy_id, version=version, stage=stage, text=text,
                        sha256=hashlib.sha256(text.encode()).hexdigest(), **kw)


@pytest.fixture(scope="module")
def keys():
    private, public = signing.generate_keypair()
    other_private, _ = signing.generate_keypair()
    return signing.load_private_key(private), signing.load_public_key(public), signing.load_private_key(other_private)


def test_a_record_must_carry_its_text_s_sha256_and_a_valid_id() -> None:
    with pytest.raises(ValidationError, match="sha256 is not the sha256 of text"):
        PolicyRecord(policy_id="p", version=1, text=FLOW, sha256="0" * 64)
    with pytest.raises(ValidationError, match="policy_id"):
        record(policy_id="a#b")
    with pytest.raises(ValidationError, match="rule indices"):
        record(actions={"first": "log"})


def test_signatures_cover_every_field(keys) -> None:
    private, public, other = keys
    signed = sign_record(record(), private)
    assert signed.key_id == signing.key_id(public)
    value = signed.model_dump_json().encode()
    assert check_record("p", value, [public]).signature == signed.signature
    # any field changed after signing: the text (with its sha256), the stage, the actions
    for change in ({"text": OTHER, "sha256": hashlib.sha256(OTHER.encode()).hexdigest()},
                   {"actions": {"0": "log"}}, {"author": "mallory"}):
        forged = signed.model_copy(update=change).model_dump_json().encode()
        with pytest.raises(RecordRefused) as err:
            check_record("p", forged, [public])
        assert err.value.reason == "signature"
    with pytest.raises(RecordRefused, match="not signed"):
        check_record("p", record().model_dump_json().encode(), [public])
    with pytest.raises(RecordRefused, match="does not match any trusted key"):
        check_record("p", sign_record(record(), other).model_dump_json().encode(), [public])
    # no trusted key configured: unsigned records are taken (a deployment that does not sign)
    assert check_record("p", record().model_dump_json().encode(), []).version == 1


def test_a_record_under_another_key_is_refused(keys) -> None:
    value = record(version=2).model_dump_json().encode()
    for key in ("q", "p@3", "p#shadow"):
        with pytest.raises(RecordRefused) as err:
            check_record(key, value, [])
        assert err.value.reason == "invalid"
    assert check_record("p@2", value, []).version == 2


def test_keys() -> None:
    assert (record_key("p"), record_key("p", "shadow"), version_key("p", 7)) == ("p", "p#shadow", "p@7")
    assert Key.parse("a.b-c@12") == Key("a.b-c", "version", 12)
    assert Key.parse("p") == Key("p", "active")


def feed(follower: RegistryFollower, *records: tuple[str, PolicyRecord | None]) -> list:
    for key, rec in records:
        follower._take(key.encode(), None if rec is None else rec.model_dump_json().encode())
    return follower.updates()


def test_the_follower_takes_newer_signed_versions_and_refuses_the_rest(keys) -> None:
    private, public, other = keys
    refused: list[tuple[str, str]] = []
    f = RegistryFollower("unused:9092", "t", [public], on_refused=lambda r, m: refused.append((r, m)))
    v1, v2 = sign_record(record(version=1), private), sign_record(record(OTHER, version=2), private)
    got = feed(f, ("p@1", v1), ("p", v1), ("p@2", v2), ("p", v2))
    assert [(u.record.version, u.stage) for u in got] == [(1, "active"), (2, "active")]  # each once
    assert got[1].policy.version == 2 and got[1].policy.rule_actions() == {0: "log"}
    # an old signed record written again (a replay by someone with topic access) does not roll back
    assert feed(f, ("p", v1)) == []
    assert refused[-1][0] == "stale" and f.active["p"].version == 2
    # unsigned, or signed by another key
    assert feed(f, ("p", record(version=3)), ("p", sign_record(record(version=3), other))) == []
    assert [r for r, _ in refused[-2:]] == ["signature", "signature"]
    # signed, but the sandbox refuses it: the version in service stays
    unsafe = 'from os import system\nraise "x" if:\n    (m: Message)\n    system("id") == 0\n'
    assert feed(f, ("p", sign_record(record(unsafe, version=3), private))) == []
    assert refused[-1][0] == "unsafe" and "refused by the policy sandbox" in refused[-1][1]
    assert feed(f, ("p", sign_record(record("raise oops\n", version=3), private))) == []
    assert refused[-1][0] == "invalid"
    assert f.refused == {"invalid": 1, "signature": 2, "unsafe": 1, "stale": 1}
    assert f.active["p"].version == 2


def test_the_follower_follows_a_shadow_candidate_to_its_promotion() -> None:
    f = RegistryFollower("unused:9092", "t")
    v1 = record(version=1)
    feed(f, ("p", v1))
    cand = record(OTHER, version=2, stage="shadow")
    got = feed(f, ("p@2", cand), ("p#shadow", cand))
    assert [(u.record.version, u.stage, u.withdrawn) for u in got] == [(2, "shadow", False)]
    promoted = cand.model_copy(update={"stage": "active"})
    got = feed(f, ("p@2", promoted), ("p", promoted), ("p#shadow", None))
    assert [(u.record.version, u.stage) for u in got] == [(2, "active")]
    assert "p" not in f.shadow
    # a candidate withdrawn without promotion is handed over as withdrawn
    feed(f, ("p#shadow", record(FLOW, version=3, stage="shadow")))
    got = feed(f, ("p#shadow", None))
    assert [(u.record.version, u.withdrawn) for u in got] == [(3, True)]


def test_the_view_the_commands_read() -> None:
    view = RegistryView()
    v1, v2 = record(version=1), record(OTHER, version=2)
    for key, rec in (("p@1", v1), ("p", v1), ("p@2", v2), ("p", v2), ("p", v1)):  # v1 replayed last
        view.add(key, rec.model_dump_json().encode())
    assert view.active("p").version == 2  # the highest active version, whatever the head says
    cand = record(FLOW, version=3, stage="shadow")
    view.add("p#shadow", cand.model_dump_json().encode())
    assert view.candidate("p").version == 3 and view.next_version("p") == 4
    view.add("p#shadow", None)
    assert view.candidate("p") is None
    view.add("p", b"not json")
    assert view.unreadable and view.active("p").version == 2
    with pytest.raises(RegistryError, match="has no version 9"):
        view.version("p", 9)
    with pytest.raises(RegistryError, match="no policy 'q'"):
        view.history("q")
    diff = diff_records(v1, v2)
    assert diff.startswith("--- p@1\n+++ p@2\n") and "+raise \"alpha seen" in diff
    assert "action of rule 0: - -> log" not in diff  # neither record sets actions


def test_actions_resolve_by_index_or_message() -> None:
    policy = load_policy_text(FLOW + OTHER, "p")
    assert resolve_actions(policy, []) == {0: "block", 1: "log"}
    assert resolve_actions(policy, parse_action_args(["0=log", "alpha seen [action=log]=block"])) == {
        0: "log", 1: "block"}
    with pytest.raises(RegistryError, match="rules 0-1"):
        resolve_actions(policy, [("5", "log")])
    with pytest.raises(RegistryError, match="no rule has that message"):
        resolve_actions(policy, [("nothing", "log")])
    with pytest.raises(RegistryError, match="expected RULE=block or RULE=log"):
        parse_action_args(["0=warn"])


def test_prepare_refuses_a_bad_or_unsafe_policy_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gr"
    bad.write_text('raise "x" if:\n    (m: Message)\n    m.content ==\n')
    with pytest.raises(PolicyLoadError) as err:
        prepare_record(bad, "p")
    assert str(bad) in str(err.value) and err.value.line
    unsafe = tmp_path / "unsafe.gr"
    unsafe.write_text('# a comment\nfrom subprocess import run\nraise "x" if:\n    (m: Message)\n    run(["id"])\n')
    with pytest.raises(PolicyLoadError) as err:
        prepare_record(unsafe, "p")
    assert f"{unsafe}:2: refused by the policy sandbox" in str(err.value)
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.gr").write_text(FLOW)
    (good / "b.gr").write_text(OTHER)
    rec = prepare_record(good, "combined", [("0", "log")], author="ops")
    assert rec.rules == ["email after the keyword", "alpha seen [action=log]"]
    assert rec.actions == {"0": "log", "1": "log"} and rec.author == "ops" and len(rec.sources) == 2


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    private, public, kid = signing.write_keypair(tmp_path / "ops")
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert signing.key_id(signing.load_public_key(public)) == kid
    with pytest.raises(signing.KeyFileError, match="never overwritten"):
        signing.write_keypair(tmp_path / "ops")
    with pytest.raises(signing.KeyFileError, match="not a PEM public key"):
        signing.load_public_key(private)
    with pytest.raises(signing.KeyFileError, match="cannot read"):
        signing.load_private_key(tmp_path / "missing.key")


@pytest.mark.parametrize("module", [monitor.registry, monitor.signing, monitor.shadow])
def test_the_module_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0


def test_at_start_only_the_version_served_is_parsed_falling_back_past_refused_ones(keys) -> None:
    private, public, _ = keys
    unsafe = 'from os import system\nraise "x" if:\n    (m: Message)\n    system("id") == 0\n'
    good, bad, broken = (sign_record(record(FLOW, version=1), private), sign_record(record(unsafe, version=2), private),
                         sign_record(record("raise oops\n", version=3), private))
    cand = sign_record(record(OTHER, version=4, stage="shadow"), private)
    gone = sign_record(record(OTHER, version=1, policy_id="q", stage="shadow"), private)
    records = [(k.encode(), r.model_dump_json().encode()) for k, r in (
        ("p@1", good), ("p", good), ("p@2", bad), ("p", bad), ("p@3", broken), ("p", broken),
        ("p#shadow", cand), ("q#shadow", gone))] + [(b"q#shadow", None)]
    f = RegistryFollower("unused:9092", "t", [public])
    f.take_all(records)
    got = f.updates()
    assert [(u.record.policy_id, u.record.version, u.stage) for u in got] == [("p", 1, "active"), ("p", 4, "shadow")]
    # each refused version once (its two keys are one version), the older good one served
    assert f.refused == {"invalid": 1, "signature": 0, "unsafe": 1, "stale": 0}
