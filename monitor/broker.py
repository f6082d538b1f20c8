"""A single-node Apache Kafka broker (KRaft) started from Kafka's own jars.

Maven fetches ``org.apache.kafka:kafka_2.13`` and a Log4j binding from Maven Central into a cache
outside the repository; the broker runs as a child JVM on free loopback ports.

Example::

    from monitor.broker import LocalBroker
    with LocalBroker() as broker:
        print(broker.bootstrap_servers)   # e.g. 127.0.0.1:40123
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import MonitorError

KAFKA_VERSION = os.environ.get("AGENT_MONITOR_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.17"


class BrokerError(MonitorError):
    """The local broker could not be fetched, started or reached."""


def cache_dir() -> Path:
    base = os.environ.get("AGENT_MONITOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agent-monitor"
    )
    return Path(base)


def state_dir() -> Path:
    return cache_dir() / "broker"


# the Maven project that fetches Kafka's jars (deploy/local/images.py builds the image's from it too)
MAVEN_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>agent-monitor</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="WARN"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


def jars_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def fetch_jars(version: str = KAFKA_VERSION, quiet: bool = True) -> Path:
    """Resolve Kafka's jars with Maven into the cache (once) and return the folder."""
    libs = jars_dir(version)
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is not on PATH: it is needed once to fetch Kafka's jars")
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(
        MAVEN_POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION)
    )
    tmp = work / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
    ]
    if quiet:
        cmd.insert(2, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(
            f"Maven could not fetch Kafka {version} jars (exit {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.write_text(version)
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return str(Path(home, "bin", "java"))
    java = shutil.which("java")
    if not java:
        raise BrokerError("java is not on PATH: Kafka 4.x needs Java 17 or newer")
    return java


def wait_until_ready(bootstrap: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                     log: Path | None = None) -> None:
    """Block until a metadata request to ``bootstrap`` lists a broker."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.split(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    admin = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise BrokerError(f"the Kafka broker exited with code {proc.returncode}:\n{tail}")
        try:
            if admin is None:
                # rdkafka logs every refused connection: wait for the port before creating a client
                socket.create_connection((host, int(port)), timeout=1).close()
                admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000,
                                     "logger": _QUIET})
            md = admin.list_topics(timeout=2)
            if md.brokers:
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.3)
    raise BrokerError(f"no Kafka broker answered a metadata request at {bootstrap} within {timeout:.0f}s"
                      + (f": {last}" if last else ""))


_QUIET = __import__("logging").getLogger("agent_monitor.broker.rdkafka")
_QUIET.addHandler(__import__("logging").NullHandler())
_QUIET.propagate = False


def warm_up_group_coordinator(bootstrap: str, timeout: float = 60.0) -> None:
    """Make the broker create ``__consumer_offsets`` now, by committing an offset for a group.

    On a brand-new broker the first consumer group finds no coordinator until that topic exists;
    aiokafka (under faust) has been seen to stall on that first ``GroupCoordinatorNotAvailable``.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _QUIET})
    topic = "__agent_monitor_warmup"
    fs = admin.create_topics([NewTopic(topic, 1, 1)])
    try:
        fs[topic].result(timeout)
    except KafkaException:
        pass  # exists already
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "agent-monitor-warmup",
                         "enable.auto.commit": False, "logger": _QUIET})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
                return
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"the broker's group coordinator did not come up: {exc}") from None
                time.sleep(0.3)
    finally:
        consumer.close()


@dataclass
class BrokerInfo:
    """What ``broker start`` records so that ``status`` and ``stop`` can find the broker."""

    pid: int
    bootstrap_servers: str
    controller_port: int
    data_dir: str
    log_file: str
    version: str


class LocalBroker:
    """A throwaway single-node KRaft broker on loopback, for tests and the demo.

    >>> with LocalBroker() as b:  # doctest: +SKIP
    ...     b.bootstrap_servers
    '127.0.0.1:40123'
    """

    def __init__(self, data_dir: str | Path | None = None, port: int | None = None,
                 version: str = KAFKA_VERSION, heap: str = "768m", partitions: int = 1,
                 jit: bool = False) -> None:
        self.version = version
        self.port = port or free_port()
        self.controller_port = free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(
            __import__("tempfile").mkdtemp(prefix="agent-monitor-kafka-")
        )
        self.heap = heap
        self.partitions = partitions
        # the C1-only JIT starts in half the time; benchmarks want the full JIT's steady state
        self.jit = jit
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        logs = self.data_dir / "kraft-logs"
        cfg = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            # a killed worker's open transaction ends (and its partitions' new owner goes on) at
            # its timeout plus this check's period: 1 s here instead of 10
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.check.interval.ms": "30000",
            "log.cleaner.backoff.ms": "5000",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in cfg.items()))
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2)
        return path

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        libs = fetch_jars(self.version)
        return [
            _java(), f"-Xms{self.heap}", f"-Xmx{self.heap}", "-XX:+UseG1GC",
            *([] if self.jit else ["-XX:TieredStopAtLevel=1"]), "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp", f"{libs}/*", main, *args,
        ]

    def start(self, timeout: float = 90.0) -> "LocalBroker":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        cluster_id = _random_cluster_id()
        fmt = subprocess.run(
            self._java_cmd("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(cfg),
                           "--standalone", "--ignore-formatted"),
            capture_output=True, text=True,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        self._launch(cfg, timeout)
        try:
            warm_up_group_coordinator(self.bootstrap_servers)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, cfg: Path, timeout: float) -> None:
        log = self.data_dir / "broker.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(cfg)), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            wait_until_ready(self.bootstrap_servers, timeout, self.proc, log)
        except BaseException:
            self.stop()
            raise

    def restart(self, down_for: float = 0.0, timeout: float = 90.0) -> "LocalBroker":
        """Stop the broker (a clean shutdown), wait ``down_for`` seconds, start it again on the same
        ports and data: what a rolling restart looks like to clients (the chaos test uses it)."""
        if self.proc is not None and self.proc.poll() is None:
            proc = self.proc
            _terminate(proc.pid, 60, lambda: proc.poll() is not None)
        time.sleep(down_for)
        self._launch(self.data_dir / "server.properties", timeout)
        return self

    def info(self) -> BrokerInfo:
        assert self.proc is not None  # noqa: S101 - only a started broker has its info
        return BrokerInfo(self.proc.pid, self.bootstrap_servers, self.controller_port,
                          str(self.data_dir), str(self.data_dir / "broker.log"), self.version)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _terminate(self.proc.pid, timeout, lambda: self.proc.poll() is not None)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _random_cluster_id() -> str:
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _terminate(pid: int, timeout: float, gone=None) -> None:
    gone = gone or (lambda: not _pid_alive(pid))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone():
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the daemon behind `agent-monitor broker start|stop|status` ---------------------------------

def _info_file() -> Path:
    return state_dir() / "broker.json"


def daemon_status() -> BrokerInfo | None:
    """The recorded broker, if its process is still alive."""
    path = _info_file()
    if not path.exists():
        return None
    info = BrokerInfo(**json.loads(path.read_text()))
    return info if _pid_alive(info.pid) else None


def daemon_start(port: int | None = None, timeout: float = 90.0) -> BrokerInfo:
    """Start a broker that outlives this process; idempotent while one is running."""
    running = daemon_status()
    if running:
        return running
    data = state_dir() / "data"
    shutil.rmtree(data, ignore_errors=True)
    broker = LocalBroker(data_dir=data, port=port)  # (a given data_dir is kept: not its own)
    broker.start(timeout)
    info = broker.info()
    _info_file().write_text(json.dumps(info.__dict__, indent=2))
    broker.proc = None  # detach: the JVM runs in its own session
    return info


def daemon_stop(timeout: float = 30.0) -> bool:
    """Stop the recorded broker. Returns False when none was running."""
    info = daemon_status()
    path = _info_file()
    if info is None:
        path.unlink(missing_ok=True)
        return False
    _terminate(info.pid, timeout)
    path.unlink(missing_ok=True)
    return True


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    with LocalBroker() as b:
        print(b.bootstrap_servers, file=sys.stderr)
        time.sleep(2)
