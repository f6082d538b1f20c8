"""The runtime's pure parts (no broker): a transactional call that librdkafka never returns from
is left behind within its bound, and the worker goes on with a new producer."""

from __future__ import annotations

import threading
import time

import pytest

from monitor import runtime
from monitor.runtime import Forwarder, Runtime, RuntimeConfig, TransactionStuck


def _runtime() -> Runtime:
    return Runtime(RuntimeConfig(bootstrap_servers="127.0.0.1:1", group_id="g", input_topic="t",
                                 guarantee="exactly-once"), Forwarder("out"))


def test_a_call_that_never_returns_is_left_behind_at_its_bound(monkeypatch):
    monkeypatch.setattr(runtime, "STUCK_GRACE_S", 0.2)
    rt = _runtime()
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(TransactionStuck, match="send_offsets_to_transaction did not return within 0.3 s"):
        rt._bounded("send_offsets_to_transaction", lambda: release.wait(30), 0.1)
    assert time.monotonic() - started < 2
    # the next call runs on a fresh thread, not behind the stuck one
    assert rt._bounded("commit_transaction", lambda: "done", 0.1) == "done"
    release.set()


def test_a_call_that_returns_or_raises_passes_through(monkeypatch):
    rt = _runtime()
    assert rt._bounded("commit_transaction", lambda: 42, 1) == 42
    with pytest.raises(ValueError, match="broker said no"):
        rt._bounded("commit_transaction", lambda: (_ for _ in ()).throw(ValueError("broker said no")), 1)


def test_a_stuck_call_replaces_the_producer_and_rewinds(monkeypatch):
    rt = _runtime()
    calls: list[str] = []
    monkeypatch.setattr(rt, "_replace_producer", lambda why: calls.append(f"replace: {why}"))
    monkeypatch.setattr(rt, "_abort", lambda begun=True: calls.append(f"abort begun={begun}"))
    rt._stuck(TransactionStuck("commit_transaction did not return within 35 s"))
    assert calls == ["replace: commit_transaction did not return within 35 s", "abort begun=False"]


class _Producer:
    """A transactional producer in the state librdkafka reports as "Erroneous state"."""

    def __init__(self) -> None:
        self.produced = 0
        self.aborted = 0

    def produce(self, *args: object) -> None:
        from confluent_kafka import KafkaError, KafkaException

        self.produced += 1
        raise KafkaException(KafkaError(KafkaError._STATE, "Unable to produce message: Local: Erroneous state"))

    def abort_transaction(self, timeout: float) -> None:
        self.aborted += 1


def test_a_transaction_in_an_error_state_is_aborted_and_its_records_done_again():
    rt = _runtime()
    rt.producer = _Producer()
    rt._txn_open, rt._txn_start, rt.assignment = True, {3: 10}, []
    rt.positions = {3: 14}  # four records processed in the transaction
    rt.produce("verdicts", b"s", b"{}")  # no exception: the record is not failed, the transaction is
    rt.produce("alerts", b"s", b"{}")
    assert rt.producer.produced == 1 and rt._doomed and "Erroneous state" in rt._doomed
    rt._commit_transaction()  # never commits a doomed transaction
    assert rt.producer.aborted == 1 and rt._doomed is None and not rt._txn_open
    assert rt.positions == {3: 10}  # its records are processed again


def test_at_least_once_produce_errors_still_raise():
    from confluent_kafka import KafkaException

    rt = Runtime(RuntimeConfig(bootstrap_servers="127.0.0.1:1", group_id="g", input_topic="t"), Forwarder("out"))
    rt.producer = _Producer()
    with pytest.raises(KafkaException):
        rt.produce("verdicts", b"s", b"{}")
