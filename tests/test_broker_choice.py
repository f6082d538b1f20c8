"""The test session's broker choice (tests/broker_choice.py), with fake brokers: no Docker, no Kafka."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import yaml
from broker_choice import (
    LOCAL_KAFKA_IMAGE,
    ROOT,
    BrokerUnavailable,
    DockerState,
    kafka_container_env,
    probe_docker,
    session_broker,
)


class Fakes:
    """Records which brokers were started and stopped, and the warnings given."""

    def __init__(self, state: DockerState, container_fails: Exception | None = None,
                 launcher_fails: Exception | None = None) -> None:
        self.state = state
        self.container_fails = container_fails
        self.launcher_fails = launcher_fails
        self.events: list[str] = []
        self.warnings: list[str] = []

    def probe(self) -> DockerState:
        self.events.append("probe")
        return self.state

    @contextmanager
    def container(self):
        self.events.append("container start")
        if self.container_fails:
            raise self.container_fails
        try:
            yield "127.0.0.1:40001"
        finally:
            self.events.append("container stop")

    @contextmanager
    def launcher(self):
        self.events.append("launcher start")
        if self.launcher_fails:
            raise self.launcher_fails
        try:
            yield "127.0.0.1:40002"
        finally:
            self.events.append("launcher stop")

    def run(self, env: str | None = None) -> str:
        with session_broker(env, self.probe, self.container, self.launcher, self.warnings.append) as bootstrap:
            self.events.append(f"use {bootstrap}")
        return bootstrap


def test_the_environment_wins_and_docker_is_not_asked():
    fakes = Fakes(DockerState(answers=True, has_image=True))
    assert fakes.run("kafka-1:9092") == "kafka-1:9092"
    assert fakes.events == ["use kafka-1:9092"]
    assert fakes.warnings == []


def test_a_daemon_with_the_local_image_gives_the_container():
    fakes = Fakes(DockerState(answers=True, has_image=True))
    assert fakes.run() == "127.0.0.1:40001"
    assert fakes.events == ["probe", "container start", "use 127.0.0.1:40001", "container stop"]
    assert fakes.warnings == []


def test_a_daemon_without_the_image_falls_back_to_the_launcher_with_a_warning():
    fakes = Fakes(DockerState(answers=True, has_image=False, detail="No such image"))
    assert fakes.run() == "127.0.0.1:40002"
    assert fakes.events == ["probe", "launcher start", "use 127.0.0.1:40002", "launcher stop"]
    (warning,) = fakes.warnings
    assert LOCAL_KAFKA_IMAGE in warning and "make images" in warning and "launcher" in warning


def test_a_container_that_does_not_start_falls_back_to_the_launcher_with_the_reason():
    fakes = Fakes(DockerState(answers=True, has_image=True),
                  container_fails=RuntimeError("the Kafka container exited (exited): bad config"))
    assert fakes.run() == "127.0.0.1:40002"
    assert fakes.events == ["probe", "container start", "launcher start", "use 127.0.0.1:40002",
                            "launcher stop"]
    (warning,) = fakes.warnings
    assert "did not start" in warning and "bad config" in warning and LOCAL_KAFKA_IMAGE in warning


def test_no_daemon_means_the_launcher_without_a_warning():
    fakes = Fakes(DockerState(answers=False, detail="connection refused"))
    assert fakes.run() == "127.0.0.1:40002"
    assert fakes.events == ["probe", "launcher start", "use 127.0.0.1:40002", "launcher stop"]
    assert fakes.warnings == []


@pytest.mark.parametrize("state", [DockerState(answers=False), DockerState(answers=True, has_image=False)])
def test_when_nothing_gives_a_broker_the_error_says_what_was_tried(state):
    fakes = Fakes(state, launcher_fails=RuntimeError("Maven (mvn) is not on PATH"))
    with pytest.raises(BrokerUnavailable) as err:
        fakes.run()
    text = str(err.value)
    assert "KAFKA_BOOTSTRAP_SERVERS is not set" in text and "Maven (mvn) is not on PATH" in text
    assert ("no Docker daemon answers" in text) == (not state.answers)


def test_a_failing_test_does_not_start_a_second_broker():
    fakes = Fakes(DockerState(answers=True, has_image=True))
    with pytest.raises(AssertionError, match="a test failed"):
        with session_broker(None, fakes.probe, fakes.container, fakes.launcher, fakes.warnings.append):
            raise AssertionError("a test failed")
    assert fakes.events == ["probe", "container start", "container stop"]
    assert fakes.warnings == []


def test_probe_docker_never_raises_when_no_daemon_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-such.sock'}")
    state = probe_docker()
    assert state.answers is False and not state.has_image and state.detail


def test_the_container_gets_the_compose_files_kafka_settings_with_its_own_host_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka"]["environment"]
    env = kafka_container_env(41234)
    assert set(env) == set(compose)
    changed = {k for k in env if env[k] != str(compose[k])}
    assert changed == {"KAFKA_ADVERTISED_LISTENERS"}
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092,HOST://127.0.0.1:41234"
