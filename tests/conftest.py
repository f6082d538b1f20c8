"""One real Kafka broker per test session, unique topic prefixes per test.

The broker comes from ``KAFKA_BOOTSTRAP_SERVERS`` when set, from a container of the locally built
Kafka image (``make images``) when a Docker daemon answers and holds it, and otherwise from the
project's own launcher (Kafka's jars via Maven), with a warning when a daemon answered but gave no
broker. When none can be had the integration tests fail with the reason; they never skip.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# (pyproject.toml's pythonpath puts tests/ and the root on sys.path: the helpers beside this file
# and deploy.local import from every folder)
ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = ROOT / "tests" / "containers"

os.environ.setdefault("LOCAL_POLICY", "1")
log = logging.getLogger("agent_monitor.tests")


_broker_warnings: list[str] = []


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap servers of the session's broker (see tests/broker_choice.py for the order)."""
    from broker_choice import BrokerUnavailable, kafka_container, launcher_broker, probe_docker, session_broker

    from monitor.broker import BrokerError, wait_until_ready

    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        try:
            wait_until_ready(env, timeout=30)
        except BrokerError as exc:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={env} is set but no broker answers there: {exc}")

    def warn(message: str) -> None:
        log.warning("%s", message)
        _broker_warnings.append(message)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            # now, not only in the summary: the launcher takes a while to start
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"WARNING kafka_bootstrap: {message}", yellow=True)

    broker = session_broker(env, probe_docker, kafka_container, launcher_broker, warn)
    try:
        bootstrap = broker.__enter__()
    except BrokerUnavailable as exc:
        pytest.fail(str(exc))
    try:
        yield bootstrap
    finally:
        broker.__exit__(None, None, None)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest's hook signature
    # the warning is printed when the broker starts too, but among the progress dots it is easy to miss
    for message in _broker_warnings:
        terminalreporter.write_line(f"WARNING kafka_bootstrap: {message}", yellow=True)


@pytest.fixture
def topic_prefix(request) -> str:
    """A prefix no other test uses, so each test has its own topics."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)



def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    # the container tests need Docker and the images of `make images`: collected only when named
    # (`make test-containers` runs `pytest tests/containers`), never by a plain `pytest` or `make test`
    if not (collection_path == CONTAINERS or CONTAINERS in collection_path.parents):
        return None
    named = [(config.invocation_params.dir / a.split("::")[0]).resolve() for a in config.args]
    return None if any(n == CONTAINERS or CONTAINERS in n.parents for n in named) else True
