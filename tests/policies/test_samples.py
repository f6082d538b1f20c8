"""The bundled sample sessions get exactly the verdicts they promise, batch by batch (no broker).

The demo plays the same files through Kafka; if a policy or an engine changes what a sample gets,
this test says which batch of which session differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.policy import PolicySet, load_policy_set, policy_files
from monitor.samples import (
    SampleError,
    SampleSession,
    is_sample,
    load_sample,
    load_samples,
    verify_sample,
)

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "examples" / "policies"
SESSIONS = ROOT / "examples" / "sessions"
SAMPLES = load_samples(SESSIONS)


@pytest.fixture(scope="module")
def policies() -> PolicySet:
    return load_policy_set(POLICIES)


@pytest.mark.parametrize("engine", ["reference", "incremental"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_sample_matches_the_engines(sample: SampleSession, engine: str, policies: PolicySet) -> None:
    # reference = invariant-ai itself, the ground truth; incremental = what the worker runs by default
    outcomes = verify_sample(sample, policies, engine=engine)
    assert len(outcomes) == len(sample.batches)
    problems = [f"batch {o.index}: {o.problem}" for o in outcomes if o.problem]
    assert not problems, f"{sample.path} ({engine}): " + "; ".join(problems)


def test_denied_batches_carry_addresses(policies: PolicySet) -> None:
    sample = load_sample(SESSIONS / "flow_send_email_split.json")
    outcomes = verify_sample(sample, policies)
    # the rule binds the user's message of batch 0 and the call of batch 1: whole-trace addresses
    assert outcomes[1].addresses == [["messages.0", "messages.0.content:8-12", "messages.1"]]


def test_a_denied_batch_does_not_join_the_past(policies: PolicySet) -> None:
    sample = load_sample(SESSIONS / "secrets_monitor_check.json")
    kept = verify_sample(sample, policies, keep_denied=True)
    dropped = verify_sample(sample, policies)
    # batch 2 (denied) is dropped: the bash call of batch 4 sits at trace index 3, not 4
    assert dropped[4].addresses == [["messages.3.tool_calls.0"]]
    assert kept[4].addresses == [["messages.4.tool_calls.0"]]


def test_every_policy_file_has_a_sample_and_every_sample_a_policy(policies: PolicySet) -> None:
    ids = {f.stem for f in policy_files(POLICIES)}
    used = {s.policy for s in SAMPLES}
    assert used <= ids, f"samples name unknown policies: {sorted(used - ids)}"
    assert ids <= used, f"policies without a sample: {sorted(ids - used)}"
    for pid in ids:
        assert policies.resolve(pid).policy_id == pid


def test_samples_cover_the_past_and_benign_sessions() -> None:
    # a deny after an allow in the same session: the rule needed an earlier batch
    past_matters = [s.name for s in SAMPLES
                    if any(e.decision == "allow" for e in s.expect) and s.expect[-1].decision == "deny"]
    benign = [s.name for s in SAMPLES if all(e.decision == "allow" for e in s.expect)]
    assert len(past_matters) >= 4, past_matters
    assert len(benign) >= 3, benign
    assert len({s.session_id for s in SAMPLES}) == len(SAMPLES), "session ids must be unique"


def test_samples_become_valid_event_batches() -> None:
    for s in SAMPLES:
        batches = s.event_batches("run1-" + s.session_id)
        assert [b.seq for b in batches] == list(range(len(s.batches)))
        assert all(b.policy == s.policy and b.session_id == "run1-" + s.session_id for b in batches)
        # events go on the wire exactly as written in the file
        assert [b.trace() for b in batches] == s.batches
        assert is_sample(json.loads((SESSIONS / f"{s.name}.json").read_text()))


def test_a_bad_sample_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"session_id": "s", "policy": "p", "batches": [[{"role": "user", "content": "x"}]],
                               "expect": []}))
    with pytest.raises(SampleError, match=r"(?s)bad\.json.*1 batches but 0 expectations"):
        load_sample(bad)
    bad.write_text("{not json")
    with pytest.raises(SampleError, match=r"bad\.json:1: not JSON"):
        load_sample(bad)
    with pytest.raises(SampleError, match="no such folder"):
        load_samples(tmp_path / "missing")
