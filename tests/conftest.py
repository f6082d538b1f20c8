"""One real Kafka broker per test session, unique topic prefixes per test.

The broker comes from ``KAFKA_BOOTSTRAP_SERVERS`` when set, from testcontainers when a Docker
daemon answers, and otherwise from the project's own launcher (Kafka's jars via Maven). When none
can be had the integration tests fail with the reason; they never skip.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

os.environ.setdefault("LOCAL_POLICY", "1")


def _docker_answers() -> bool:
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no daemon"
        return False


class BrokerUnavailable(RuntimeError):
    pass


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of the session's broker."""
    from monitor.broker import BrokerError, LocalBroker, wait_until_ready

    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        try:
            wait_until_ready(env, timeout=30)
        except BrokerError as exc:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={env} is set but no broker answers there: {exc}")
        yield env
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    try:
        broker = LocalBroker(heap="1g").start(timeout=120)
    except BrokerError as exc:
        pytest.fail(
            "no Kafka broker for the integration tests: KAFKA_BOOTSTRAP_SERVERS is not set, no Docker "
            f"daemon answers, and the local launcher failed: {exc}"
        )
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix(request) -> str:
    """A prefix no other test uses, so each test has its own topics."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
