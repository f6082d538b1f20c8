"""A new policy version in the middle of sessions (no broker): the session's past survives it.

A worker that follows the registry keeps each session's last ``--history`` raw events; a new
version rebuilds its state from them. Here every sample session is cut at every batch: the first
part runs on an earlier version (the same rules in another text, so another sha256), the rest on
the real one after ``install``; every verdict after the cut must equal the real policy's from the
start (decision, messages, keys, addresses), on both engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from monitor.config import WorkerSettings
from monitor.core import BatchEvaluator
from monitor.policy import LoadedPolicy, PolicySet, load_policy, load_policy_text
from monitor.samples import SampleSession, load_samples
from monitor.state import SessionStore

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = [s for s in load_samples(ROOT / "examples" / "sessions") if len(s.batches) > 1]


def policy_of(sample: SampleSession) -> LoadedPolicy:
    return load_policy(ROOT / "examples" / "policies" / f"{sample.policy}.gr", policy_id=sample.policy)


def verdicts(core: BatchEvaluator, store: SessionStore, sample: SampleSession, start: int, stop: int,
             then: LoadedPolicy | None = None) -> list:
    out = []
    for batch in sample.event_batches()[start:stop]:
        out.append(asyncio.run(core.evaluate(store, batch, None)).verdict)
    return out


def shape(v) -> tuple:
    return v.decision, v.reason, [(x.message, x.key, x.addresses, x.action) for x in v.violations]


@pytest.mark.parametrize("engine", ["incremental", "reference"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_a_version_installed_mid_session_keeps_the_past(sample: SampleSession, engine: str) -> None:
    real = policy_of(sample)
    settings = WorkerSettings(policy_path="-", engine=engine)
    expected = verdicts(BatchEvaluator(PolicySet.single(real), settings), SessionStore({}), sample, 0,
                        len(sample.batches))
    registry = WorkerSettings(policy_registry=True, engine=engine)
    for cut in range(1, len(sample.batches)):
        earlier = load_policy_text(real.text + "\n# an earlier version of the same rules\n", real.policy_id)
        earlier.version, real.version = 1, 2
        core = BatchEvaluator(PolicySet.single(earlier), registry)
        store = SessionStore({})
        try:
            verdicts(core, store, sample, 0, cut)
            core.install(real)
            after = verdicts(core, store, sample, cut, len(sample.batches))
        finally:
            core.close()
        assert [shape(v) for v in after] == [shape(v) for v in expected[cut:]], f"cut before batch {cut}"
        assert {v.policy_version for v in after} == {2}
        assert {v.policy_sha256 for v in after} == {real.sha256}


def test_without_kept_events_a_flow_across_the_update_is_missed() -> None:
    """What the kept events buy: a worker that keeps none (files, no registry) loses the past."""
    sample = next(s for s in SAMPLES if s.name == "flow_send_email_split")
    real = policy_of(sample)
    for keep, decision in ((False, "allow"), (True, "deny")):
        earlier = load_policy_text(real.text + "\n# v1\n", real.policy_id)
        settings = WorkerSettings(policy_registry=True) if keep else WorkerSettings(policy_path="-")
        core = BatchEvaluator(PolicySet.single(earlier), settings)
        store = SessionStore({})
        try:
            assert verdicts(core, store, sample, 0, 1)[0].decision == "allow"
            core.install(real)
            assert verdicts(core, store, sample, 1, 2)[0].decision == decision
        finally:
            core.close()


def test_the_kept_events_are_bounded_by_history() -> None:
    policy = load_policy_text('raise "x" if:\n    (m: Message) -> (t: ToolCall)\n    "send" in m.content\n'
                              '    t is tool:send_email\n', "p")
    history = 50
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_registry=True,
                                                                   reference_max_history=history))
    store = SessionStore({})
    from monitor.models import EventBatch

    try:
        for i in range(200):
            events = [{"role": "user", "content": f"note {i}"}, {"role": "assistant", "content": "ok"}]
            asyncio.run(core.evaluate(store, EventBatch(session_id="s", batch_id=f"b{i}", events=events), None))
            cursor = store.head("s").policies["p"]
            assert (cursor.raw_start, cursor.raw_end) == (max(0, 2 * i + 2 - history), 2 * i + 2)
    finally:
        core.close()
    assert len([k for k in store.table if k.startswith("r")]) == history
    # the files worker keeps none
    core = BatchEvaluator(PolicySet.single(policy), WorkerSettings(policy_path="-"))
    store = SessionStore({})
    try:
        asyncio.run(core.evaluate(store, EventBatch(session_id="s", batch_id="b", events=[
            {"role": "user", "content": "x"}]), None))
    finally:
        core.close()
    assert not [k for k in store.table if k.startswith("r")]


ALPHA = 'raise "alpha" if:\n    (m: Message)\n    "alpha" in m.content\n'
BETA = 'raise "beta" if:\n    (m: Message)\n    "beta" in m.content\n'
FLOW = ('raise "email after send" if:\n    (m: Message) -> (t: ToolCall)\n    "send" in m.content\n'
        '    t is tool:send_email\n')


def versioned(text: str, version: int) -> LoadedPolicy:
    policy = load_policy_text(text, "p")
    policy.version = version
    return policy


def check(core: BatchEvaluator, store: SessionStore, sid: str, bid: str, events: list[dict]):
    from monitor.models import EventBatch

    return asyncio.run(core.evaluate(store, EventBatch(session_id=sid, batch_id=bid, events=events), None))


def test_a_shadow_candidate_is_checked_beside_the_active_version_and_never_decides() -> None:
    core = BatchEvaluator(PolicySet.single(versioned(ALPHA + FLOW, 1)), WorkerSettings(policy_registry=True))
    store = SessionStore({})
    try:
        first = check(core, store, "s", "b1", [{"role": "user", "content": "send it"}])
        assert first.shadow is None
        core.install_shadow(versioned(BETA + FLOW, 2))
        out = check(core, store, "s", "b2", [{"role": "user", "content": "alpha and beta"}])
        assert out.verdict.decision == "deny" and out.verdict.policy_version == 1
        assert [v.message for v in out.verdict.violations] == ["alpha"]
        shadow = out.shadow
        assert shadow.differs and shadow.active == out.verdict
        assert shadow.candidate.policy_version == 2 and [v.message for v in shadow.candidate.violations] == ["beta"]
        # the candidate started from the active version's past: the flow begun in b1 completes
        out = check(core, store, "s", "b3", [{"type": "function", "id": "1",
                                              "function": {"name": "send_email", "arguments": {}}}])
        assert [v.message for v in out.shadow.candidate.violations] == ["email after send"]
        assert not out.shadow.differs
        assert "p#shadow" in store.head("s").policies
        # withdrawn: no more shadow verdicts, and its state goes with the session's next batch
        core.withdraw_shadow("p")
        out = check(core, store, "s", "b4", [{"role": "user", "content": "hello"}])
        assert out.shadow is None and "p#shadow" not in store.head("s").policies
        assert not [k for k in store.table if "p#shadow" in k]
        # promotion: the candidate's text becomes the active version
        core.install_shadow(versioned(BETA, 3))
        core.install(versioned(BETA, 3))
        assert core.shadows == {}
        out = check(core, store, "s", "b5", [{"role": "user", "content": "beta"}])
        assert out.verdict.policy_version == 3 and out.verdict.decision == "deny" and out.shadow is None
    finally:
        core.close()
