"""Publishing a replay's verdicts and alerts under a prefix of its own (``replay --publish``), as
the worker would have published them; never to the topics it reads."""

from __future__ import annotations

import sys

from monitor.config import TopicNames, WorkerSettings
from monitor.limits import alert_records
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

    def send(self, verdict: Verdict, violations: list[Violation] | None = None) -> None:
        """What the worker publishes for a batch: its verdict (a repeat: the stored one; the core
        fitted it to its topic already) and an alert per violation of ``violations`` (default:
        the verdict's), within the worker's limits."""
        key = verdict.session_id.encode()
        self._produce(self.topics.verdicts, key, verdict.model_dump_json().encode())
        alerted = verdict.violations if violations is None else violations
        for _alert, raw in alert_records(verdict, alerted, self.limits.max_batch_alerts,
                                         self.limits.max_output_bytes):
            self._produce(self.topics.alerts, key, raw)

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
