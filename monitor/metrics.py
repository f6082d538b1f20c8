"""Prometheus metrics of a monitor worker, and a small /metrics server with an optional bearer token.

Every ``WorkerMetrics`` has its own ``CollectorRegistry``, so tests and several workers in one
process never collide on metric names. Metric names (all prefixed ``agent_monitor_``) are what
``deploy/alert-rules.yml`` and ``deploy/grafana/dashboard.json`` query; a test keeps them in step.

Example::

    >>> from monitor.metrics import WorkerMetrics
    >>> from monitor.models import Verdict
    >>> m = WorkerMetrics(engine="reference")
    >>> m.batch_consumed(events=3)
    >>> m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="allow"), eval_seconds=0.004)
    >>> m.value("agent_monitor_verdicts_total", decision="allow")
    1.0
    >>> m.value("agent_monitor_events_total")
    3.0

Serving (Prometheus scrapes ``http://HOST:PORT/metrics``; with a token it must send
``Authorization: Bearer <token>``)::

    server = serve_metrics(m.registry, port=9464, host="0.0.0.0", token="s3cret")
    ...
    server.close()
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from monitor.errors import EXIT_USAGE, MonitorError
from monitor.models import Alert, DeadLetterKind, Verdict, Violation

log = logging.getLogger(__name__)

TOKEN_ENV = "AGENT_MONITOR_METRICS_TOKEN"
"""Bearer token required on /metrics when set (as invariant-server's ``PROMETHEUS_TOKEN``)."""

HOST_ENV = "AGENT_MONITOR_METRICS_HOST"
"""Address /metrics binds to when the caller does not say (loopback unless set)."""

DEFAULT_METRICS_PORT = 9464
MAX_CONNECTIONS = 32  # served at once; Prometheus needs one per scrape
REQUEST_TIMEOUT_S = 5.0  # to send a request and read the answer

# from well under a millisecond (incremental engine) to past the default 5 s budget
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MAX_RULE_LABEL = 120
MAX_RULES = 200
OTHER_RULE = "(other)"
POLICY_FAILURE_KINDS = ("error", "timeout")


class WorkerMetrics:
    """The metrics of one worker, on its own registry.

    Call the methods from the worker's stream loop; all are cheap and thread-safe.

    >>> m = WorkerMetrics()
    >>> m.dead_letter("not_json")
    >>> m.policy_failure("timeout")
    >>> m.value("agent_monitor_dead_letters_total", kind="not_json"), m.value(
    ...     "agent_monitor_policy_failures_total", kind="timeout")
    (1.0, 1.0)
    """

    def __init__(self, engine: str = "unknown", registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter("agent_monitor_batches", "Event batches consumed from the events topic", registry=r)
        self.events = Counter("agent_monitor_events", "Events inside consumed batches", registry=r)
        self.verdicts = Counter("agent_monitor_verdicts", "Verdicts published, by decision",
                                ["decision"], registry=r)
        self.violations = Counter("agent_monitor_violations",
                                  "Rule violations in verdicts, by rule message and severity",
                                  ["rule", "severity"], registry=r)
        self.alerts = Counter("agent_monitor_alerts", "Alerts published, by rule message and severity",
                              ["rule", "severity"], registry=r)
        self.duplicates = Counter("agent_monitor_duplicate_batches",
                                  "Redelivered batches answered with their earlier verdict", registry=r)
        self.dead_letters = Counter("agent_monitor_dead_letters", "Records sent to the dead-letter topic, by kind",
                                    ["kind"], registry=r)
        self.policy_failures = Counter("agent_monitor_policy_failures",
                                       "Policy checks that errored or overran their budget (fail-closed denies)",
                                       ["kind"], registry=r)
        self.check_seconds = Histogram("agent_monitor_check_seconds", "Time to check one batch against its policy",
                                       ["engine"], buckets=LATENCY_BUCKETS, registry=r)
        self.sessions = Gauge("agent_monitor_sessions", "Sessions held in this worker's state", registry=r)
        self.consumer_lag = Gauge("agent_monitor_consumer_lag",
                                  "Records between the committed offset and the end of an events partition",
                                  ["partition"], registry=r)
        self.policy_info = Gauge("agent_monitor_policy_info", "The loaded policy (value 1)",
                                 ["policy_id", "policy_sha256"], registry=r)
        self._rules: set[str] = set()
        self._rules_lock = threading.Lock()
        # zero series exist from the start, so rate() and increase() see the first event
        for decision in ("allow", "deny"):
            self.verdicts.labels(decision=decision)
        for kind in get_args(DeadLetterKind):
            self.dead_letters.labels(kind=kind)
        for kind in POLICY_FAILURE_KINDS:
            self.policy_failures.labels(kind=kind)
        if engine != "unknown":
            self.check_seconds.labels(engine=engine)

    # -- the stream loop ------------------------------------------------------------------------

    def batch_consumed(self, events: int) -> None:
        """One batch with ``events`` events was taken from the events topic."""
        self.batches.inc()
        self.events.inc(max(0, events))

    def observe_verdict(self, verdict: Verdict, eval_seconds: float | None = None,
                        engine: str | None = None) -> None:
        """A verdict was published: count it and its violations; record the check's latency.

        ``eval_seconds`` defaults to ``verdict.eval_ms / 1000``. Call it for checked batches only:
        a verdict repeated for a redelivered batch goes to :meth:`duplicate_batch`.
        """
        self.verdicts.labels(decision=verdict.decision).inc()
        for v in verdict.violations:
            self.violations.labels(rule=self._rule(v.message), severity=v.severity).inc()
        seconds = verdict.eval_ms / 1000.0 if eval_seconds is None else eval_seconds
        self.check_seconds.labels(engine=engine or verdict.engine or self.engine).observe(max(0.0, seconds))

    def alert_published(self, alert: Alert | Violation) -> None:
        """An alert went to the alerts topic."""
        self.alerts.labels(rule=self._rule(alert.message), severity=alert.severity).inc()

    def duplicate_batch(self) -> None:
        """A redelivered batch (known ``batch_id``) got its earlier verdict again."""
        self.duplicates.inc()

    def dead_letter(self, kind: DeadLetterKind | str) -> None:
        """A record went to the dead-letter topic (``not_json``, ``invalid``, ``too_large``, ...)."""
        self.dead_letters.labels(kind=kind).inc()

    def policy_failure(self, kind: str) -> None:
        """A policy check failed: ``error`` (it raised) or ``timeout`` (it overran its budget)."""
        if kind not in POLICY_FAILURE_KINDS:
            raise ValueError(f"policy failure kind must be one of {POLICY_FAILURE_KINDS}, got {kind!r}")
        self.policy_failures.labels(kind=kind).inc()

    # -- state ----------------------------------------------------------------------------------

    def set_sessions(self, count: int) -> None:
        """How many sessions this worker holds in its table right now."""
        self.sessions.set(count)

    def set_consumer_lag(self, partition: int, lag: int) -> None:
        """The events partition's lag as this worker sees it (end offset - committed offset)."""
        self.consumer_lag.labels(partition=str(partition)).set(max(0, lag))

    def forget_partitions(self, partitions: Iterable[int] | None = None) -> None:
        """Drop lag series of partitions revoked in a rebalance (all when ``None``)."""
        if partitions is None:
            self.consumer_lag.clear()
            return
        for p in partitions:
            try:
                self.consumer_lag.remove(str(p))
            except KeyError:
                pass

    def set_policy(self, policy_id: str | None, policy_sha256: str | None) -> None:
        """The policy now loaded (after start or a hot reload)."""
        self.policy_info.clear()
        self.policy_info.labels(policy_id=policy_id or "", policy_sha256=policy_sha256 or "").set(1)

    # -- reading back ---------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0.0 when absent); for tests and the CLI.

        ``name`` is the sample name: ``agent_monitor_verdicts_total``, ``agent_monitor_sessions``,
        ``agent_monitor_check_seconds_count``...
        """
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else got

    def _rule(self, message: str) -> str:
        # rule messages come from the policy (a bounded set), but cap label length and count anyway:
        # a policy that formats values into its messages must not explode the series count
        rule = " ".join(message.split())[:MAX_RULE_LABEL] or "(empty)"
        with self._rules_lock:
            if rule in self._rules:
                return rule
            if len(self._rules) >= MAX_RULES:
                return OTHER_RULE
            self._rules.add(rule)
            return rule


# ------------------------------------------------------------------------------------------------
# Serving


class MetricsServer:
    """A running /metrics endpoint (a daemon thread). Close it, or use it as a context manager."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsExposed(MonitorError):
    """/metrics would be served beyond loopback without a token; the message says how to set one."""

    exit_code = EXIT_USAGE


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) only accepts local connections.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve beyond loopback


def serve_metrics(registry: CollectorRegistry, port: int = DEFAULT_METRICS_PORT, host: str | None = None,
                  token: str | None = None, max_connections: int = MAX_CONNECTIONS,
                  timeout: float = REQUEST_TIMEOUT_S) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a background thread.

    ``token``: when set, every /metrics request needs ``Authorization: Bearer <token>`` (401
    otherwise). ``None`` reads ``$AGENT_MONITOR_METRICS_TOKEN``; unset or empty means no token,
    which is refused (:class:`MetricsExposed`) unless ``host`` is loopback.
    ``/healthz`` answers ``ok`` without a token (it reveals nothing). ``port=0`` picks a free port.
    ``host``: ``None`` reads ``$AGENT_MONITOR_METRICS_HOST``, else loopback (``127.0.0.1``); a
    container sets ``AGENT_MONITOR_METRICS_HOST=0.0.0.0`` so Prometheus can reach it.
    A connection has ``timeout`` seconds to send its request and take the answer, and at most
    ``max_connections`` are served at once (one more is closed at once): half-open connections
    cannot hold the server's threads.

    >>> m = WorkerMetrics()
    >>> with serve_metrics(m.registry, port=0, token="t") as srv:
    ...     import urllib.request, urllib.error
    ...     try:
    ...         urllib.request.urlopen(srv.url)
    ...     except urllib.error.HTTPError as e:
    ...         print(e.code)
    ...     req = urllib.request.Request(srv.url, headers={"Authorization": "Bearer t"})
    ...     b"agent_monitor_verdicts_total" in urllib.request.urlopen(req).read()
    401
    True
    """
    if host is None:
        host = os.environ.get(HOST_ENV) or "127.0.0.1"
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if not token and not is_loopback(host):
        raise MetricsExposed(
            f"refusing to serve /metrics on {host} without a token: set {TOKEN_ENV} (e.g. "
            f"`export {TOKEN_ENV}=$(openssl rand -hex 32)`) and give Prometheus the same bearer token, "
            f"or bind loopback ({HOST_ENV}=127.0.0.1)")
    expected = f"Bearer {token}".encode() if token else None
    request_timeout = timeout

    class Handler(BaseHTTPRequestHandler):
        server_version = "agent-monitor"
        sys_version = ""
        # the socket's timeout: a client that sends nothing (or reads nothing) is dropped
        timeout = request_timeout

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
                return
            if path not in ("/metrics", "/metrics/"):
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
                return
            if expected is not None:
                got = (self.headers.get("Authorization") or "").encode()
                # constant time: the token must not leak through response timing
                if not hmac.compare_digest(got, expected):
                    self._send(401, b"unauthorized\n", "text/plain; charset=utf-8",
                               {"WWW-Authenticate": 'Bearer realm="agent-monitor metrics"'})
                    return
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            try:
                body = encoder(registry)
            except Exception:  # noqa: BLE001 - a broken collector must not kill the server
                log.exception("collecting metrics failed")
                self._send(500, b"collecting metrics failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, content_type)

        def _send(self, code: int, body: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("metrics: " + format, *args)

    slots = threading.BoundedSemaphore(max_connections)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128  # waiting in the kernel's queue costs no thread

        def process_request(self, request: Any, client_address: Any) -> None:
            if not slots.acquire(blocking=False):
                # over the cap: closed at once, no thread for it
                log.warning("metrics: more than %d connections, closing one from %s", max_connections,
                            client_address)
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                slots.release()

    httpd = Server((host, port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="agent-monitor-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)
