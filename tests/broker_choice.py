"""Which Kafka broker a test session gets, and the fallback when a Docker daemon cannot give one.

Order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; else a container of the locally built Kafka image
(``make images``) when a Docker daemon answers and holds it; else the project's own launcher
(:class:`monitor.broker.LocalBroker`). A daemon that answers never fails the session by itself: no
image, or a container that does not come up, means the launcher, with a warning that says why.
No image is ever pulled: no registry is reachable from these machines.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.local.images import KAFKA_IMAGE
from deploy.local.stack import environment_for_tests, local_plan
from monitor.broker import BrokerError, free_port, wait_until_ready, warm_up_group_coordinator

ROOT = Path(__file__).resolve().parent.parent
# built by `make images` (deploy/local); the compose file's apache/kafka cannot be pulled here
LOCAL_KAFKA_IMAGE = KAFKA_IMAGE
HOST_LISTENER_PORT = 29092  # the kafka service's HOST listener in docker-compose.yml


class BrokerUnavailable(RuntimeError):
    """No broker could be had; the message says what was tried."""


@dataclass(frozen=True)
class DockerState:
    """What the Docker daemon said: whether it answers and whether it holds the Kafka image."""

    answers: bool
    has_image: bool = False
    detail: str = ""


def probe_docker(image: str = LOCAL_KAFKA_IMAGE) -> DockerState:
    """Ask the daemon (3 s timeout) whether it answers and holds ``image``; never raises."""
    try:
        import docker  # testcontainers' dependency

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no daemon"
        return DockerState(answers=False, detail=str(exc))
    try:
        client.images.get(image)
        return DockerState(answers=True, has_image=True)
    except Exception as exc:  # noqa: BLE001 - not found, or the daemon failed: no image either way
        return DockerState(answers=True, has_image=False, detail=str(exc))
    finally:
        client.close()


@contextmanager
def session_broker(
    env_bootstrap: str | None,
    probe: Callable[[], DockerState],
    start_container: Callable[[], AbstractContextManager[str]],
    start_launcher: Callable[[], AbstractContextManager[str]],
    warn: Callable[[str], None],
    image: str = LOCAL_KAFKA_IMAGE,
) -> Iterator[str]:
    """Yield the bootstrap servers of the session's broker and stop it afterwards.

    ``start_container``/``start_launcher`` return context managers that start a broker on entry
    (raising if they cannot) and stop it on exit. Only a failure to *start* the container leads to
    the launcher; an exception from the body (a test) is not a reason to start another broker.
    """
    if env_bootstrap:
        yield env_bootstrap
        return
    state = probe()
    if state.answers and state.has_image:
        stack = ExitStack()
        try:
            bootstrap = stack.enter_context(start_container())
        except Exception as exc:  # noqa: BLE001 - any failure to start means: use the launcher
            stack.close()
            warn(f"a Docker daemon answers, but a container of {image} did not start ({_short(exc)}): "
                 "using the local launcher (Kafka's jars) instead")
        else:
            with stack:
                yield bootstrap
            return
    elif state.answers:
        warn(f"a Docker daemon answers, but it has no image {image} (`make images` builds it; no "
             "registry is reachable to pull one): using the local launcher (Kafka's jars) instead")
    try:
        launcher = start_launcher()
        bootstrap = launcher.__enter__()
    except Exception as exc:  # noqa: BLE001 - reported with everything that was tried
        daemon = ("no Docker daemon answers" if not state.answers else
                  "the Docker daemon gave no broker (see the warning above)")
        raise BrokerUnavailable(
            f"no Kafka broker for the integration tests: KAFKA_BOOTSTRAP_SERVERS is not set, {daemon}, "
            f"and the local launcher failed: {exc}") from exc
    try:
        yield bootstrap
    finally:
        launcher.__exit__(None, None, None)


def _short(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


def kafka_container_env(host_port: int) -> dict[str, str]:
    """The compose file's Kafka settings (as `make test-containers` reads them), with the HOST
    listener advertised at ``host_port``."""
    env = dict(local_plan(environment_for_tests("unused")).services["kafka"].environment)
    old = f"HOST://127.0.0.1:{HOST_LISTENER_PORT}"
    assert old in env["KAFKA_ADVERTISED_LISTENERS"], "docker-compose.yml's HOST listener moved"
    env["KAFKA_ADVERTISED_LISTENERS"] = env["KAFKA_ADVERTISED_LISTENERS"].replace(
        old, f"HOST://127.0.0.1:{host_port}")
    return env


@contextmanager
def kafka_container(image: str = LOCAL_KAFKA_IMAGE, timeout: float = 120.0) -> Iterator[str]:
    """A container of ``image`` configured as docker-compose.yml's kafka service, its HOST listener
    published on a free loopback port; yields ``127.0.0.1:<port>``. Raises if it does not come up."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer

    # Ryuk (the reaper) is an image from Docker Hub, which cannot be pulled here: this function
    # removes its container itself
    testcontainers_config.ryuk_disabled = True
    port = free_port()
    hostname = local_plan(environment_for_tests("unused")).services["kafka"].hostname
    container = DockerContainer(image, hostname=hostname, name=f"agent-monitor-test-kafka-{uuid.uuid4().hex[:8]}")
    container.with_envs(**kafka_container_env(port))
    # bound to loopback, as the compose file publishes it (with_bind_ports takes no address)
    container.ports[f"{HOST_LISTENER_PORT}/tcp"] = ("127.0.0.1", port)
    bootstrap = f"127.0.0.1:{port}"
    try:
        container.start()  # inside the try: a container created but not started is removed too
        _wait_for_container_broker(container, bootstrap, timeout)
        yield bootstrap
    finally:
        with contextlib.suppress(Exception):
            container.stop()


def _wait_for_container_broker(container, bootstrap: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status not in ("created", "running"):
            logs = wrapped.logs().decode(errors="replace")[-3000:]
            raise BrokerError(f"the Kafka container exited ({wrapped.status}):\n{logs}")
        try:
            wait_until_ready(bootstrap, timeout=min(5.0, max(1.0, deadline - time.monotonic())))
            warm_up_group_coordinator(bootstrap)
            return
        except BrokerError:
            if time.monotonic() > deadline:
                logs = wrapped.logs().decode(errors="replace")[-3000:]
                raise BrokerError(f"the Kafka container answered no metadata request at {bootstrap} "
                                  f"within {timeout:.0f}s:\n{logs}") from None


@contextmanager
def launcher_broker() -> Iterator[str]:
    """The project's own launcher: a broker from Kafka's jars (fetched once by Maven)."""
    from monitor.broker import LocalBroker

    broker = LocalBroker(heap="1g").start(timeout=120)
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
