"""Publishing a replay's verdicts and alerts under a prefix of its own (``replay --publish``), as
the worker would have published them; never to the topics it reads."""

from __future__ import annotations

import sys

from monitor.config import TopicNames, WorkerSettings
from monitor.limits import alert_records, fit_verdict
from monitor.models import Verdict, Violation
from monitor.replay.request import ReplayError


class Publisher:
    """Verdicts and alerts of a replay to ``<prefix>.verdicts`` / ``<prefix>.alerts``."""

    def __init__(self, bootstrap: str, prefix: str, limits: WorkerSettings | None = None) -> None:
        from confluent_kafka import Producer

        self.limits = limits or WorkerSettings(policy_path="-")  # the worker's output limits
        self.topics = TopicNames.for_prefix(prefix)
        try:  # a cluster may not auto-create topics; provisioning is idempotent
            from monitor.topics import create_topics

            create_topics(bootstrap, prefix)
        except Exception as exc:  # noqa: BLE001 - producing will say what is wrong, if anything
            print(f"replay: could not provision topics under {prefix!r}: {exc}", file=sys.stderr)
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                                  "partitioner": "murmur2_random"})

    def send(self, verdict: Verdict, omitted: tuple[Violation, ...] = ()) -> None:
        """What the worker publishes for a batch: its verdict (a repeat: the stored one) and an
        alert per violation, those past the verdict's cap included."""
        key = verdict.session_id.encode()
        raw = verdict.model_dump_json().encode()
        verdict, raw, left_out = fit_verdict(verdict, raw, self.limits.max_output_bytes)
        self._produce(self.topics.verdicts, key, raw)
        for _alert, alert_raw in alert_records(verdict, left_out + tuple(omitted), self.limits.max_batch_alerts,
                                               self.limits.max_output_bytes):
            self._produce(self.topics.alerts, key, alert_raw)

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def close(self) -> None:
        left = self.producer.flush(30)
        if left:
            raise ReplayError(f"{left} verdicts/alerts could not be published")
