"""Prometheus metrics of a monitor worker, and a small /metrics server with an optional bearer token.

Every ``WorkerMetrics`` has its own ``CollectorRegistry``, so tests and several workers in one
process never collide on metric names. Metric names (all prefixed ``agent_monitor_``, units in the
name, counters ending in ``_total``) are what ``deploy/alert-rules.yml``,
``deploy/grafana/dashboard.json`` and ``agent-monitor top`` read; tests keep them in step, and
:data:`METRICS` lists them all with their type and labels.

The worker's loop calls the recording methods for every record, thousands of times a second, so
they only add to plain numbers (a few hundred nanoseconds; prometheus-client's own counters take
a lock and a label lookup, several microseconds); the numbers become Prometheus samples when
/metrics is scraped. Only the loop's thread records; the server's thread reads copies.

Example::

    >>> from monitor.metrics import WorkerMetrics
    >>> from monitor.models import Verdict
    >>> m = WorkerMetrics(engine="reference")
    >>> m.batch_consumed(events=3)
    >>> m.observe_verdict(Verdict(session_id="s", batch_id="b", decision="allow"), eval_seconds=0.004)
    >>> m.observe_verdict_latency(0.012)
    >>> m.value("agent_monitor_verdicts_total", decision="allow")
    1.0
    >>> m.value("agent_monitor_events_total")
    3.0
    >>> m.value("agent_monitor_verdict_latency_seconds_bucket", le="0.025")
    1.0

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
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from monitor.errors import EXIT_USAGE, MonitorError
from monitor.models import Alert, DeadLetterKind, Verdict, Violation
from monitor.registry import REFUSAL_REASONS

log = logging.getLogger(__name__)

TOKEN_ENV = "AGENT_MONITOR_METRICS_TOKEN"  # noqa: S105 - the variable's name, not a token
"""Bearer token required on /metrics when set (as invariant-server's ``PROMETHEUS_TOKEN``)."""

HOST_ENV = "AGENT_MONITOR_METRICS_HOST"
"""Address /metrics binds to when the caller does not say (loopback unless set)."""

DEFAULT_METRICS_PORT = 9464
MAX_CONNECTIONS = 32  # served at once; Prometheus needs one per scrape
REQUEST_TIMEOUT_S = 5.0  # to send a request and read the answer

# one check: from well under a millisecond (incremental engine) to past the default 5 s budget
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# produce -> verdict: a few milliseconds on a caught-up worker, minutes behind a backlog
VERDICT_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                           30.0, 60.0, 300.0)

MAX_RULE_LABEL = 120
MAX_RULES = 200
OTHER_RULE = "(other)"
RULE_MEMO = 10_000
POLICY_FAILURE_KINDS = ("error", "timeout")
FILE_POLICY_VERSION = "file"
"""The ``version`` label of a policy loaded from a file (a policy registry names its versions)."""

METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (type, labels, help)
    "agent_monitor_batches_total": ("counter", (), "Event batches consumed and answered"),
    "agent_monitor_events_total": ("counter", (), "Events inside those batches"),
    "agent_monitor_verdicts_total": ("counter", ("decision",), "Verdicts decided, by decision (repeats of a "
                                     "redelivered batch are in agent_monitor_duplicate_batches_total)"),
    "agent_monitor_duplicate_batches_total": ("counter", (), "Redelivered batches answered with their earlier "
                                              "verdict"),
    "agent_monitor_violations_total": ("counter", ("rule", "severity"), "Rule violations in verdicts, by rule "
                                       "message and severity"),
    "agent_monitor_alerts_total": ("counter", ("rule", "severity"), "Alerts published, by rule message and "
                                   "severity"),
    "agent_monitor_dead_letters_total": ("counter", ("kind",), "Records sent to the dead-letter topic, by kind"),
    "agent_monitor_policy_failures_total": ("counter", ("kind",), "Policy checks that raised (error) or overran "
                                            "their time budget (timeout): fail-closed denies"),
    "agent_monitor_check_seconds": ("histogram", ("engine",), "Time to check one batch against its policy"),
    "agent_monitor_verdict_latency_seconds": ("histogram", (), "From the event record's Kafka timestamp to its "
                                              "verdict being produced"),
    "agent_monitor_sessions": ("gauge", (), "Sessions held in this worker's state"),
    "agent_monitor_state_keys": ("gauge", ("partition",), "Keys of the state table, per events partition"),
    "agent_monitor_consumer_lag_records": ("gauge", ("partition",), "Records of an events partition not yet "
                                           "processed"),
    "agent_monitor_consumer_lag_seconds": ("gauge", ("partition",), "Age of the last processed record of a "
                                           "partition while records wait behind it (0 when caught up)"),
    "agent_monitor_assigned_partitions": ("gauge", (), "Events partitions assigned to this worker"),
    "agent_monitor_rebalances_total": ("counter", (), "Partition assignments and revocations this worker took "
                                       "part in"),
    "agent_monitor_commits_total": ("counter", (), "Offset commits (at-least-once) or transactions committed "
                                    "(exactly-once)"),
    "agent_monitor_transaction_aborts_total": ("counter", (), "Transactions aborted and rewound (exactly-once)"),
    "agent_monitor_heartbeat_timestamp_seconds": ("gauge", (), "Unix time of the worker loop's last tick (about "
                                                  "every second): it stops when the loop is stuck"),
    "agent_monitor_policy_info": ("gauge", ("policy_id", "version", "policy_sha256"), "The active version of "
                                  "each policy served (value 1)"),
    "agent_monitor_policy_records_refused_total": ("counter", ("reason",), "Policy registry records this worker "
                                                   "refused (the version in service stays), by reason"),
    "agent_monitor_worker_info": ("gauge", ("worker_id", "engine", "guarantee", "version"), "This worker "
                                  "(value 1)"),
}


class Buckets:
    """A histogram's counts for one label set; written by one thread, read by the scrape.

    >>> b = Buckets((0.1, 1.0))
    >>> b.observe(0.05); b.observe(0.5); b.observe(7.0)
    >>> b.cumulative(), b.sum
    ([('0.1', 1), ('1.0', 2), ('+Inf', 3)], 7.55)
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative: one increment per observation
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus' le ("less or equal") wants
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        counts, total, out = list(self.counts), 0, []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=False):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class WorkerMetrics:
    """The metrics of one worker, on its own registry.

    Call the recording methods from the worker's loop (one thread); /metrics reads them from the
    server's thread.

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
        self.batches = 0
        self.events = 0
        self.duplicates = 0
        # zero series exist from the start, so rate() and increase() see the first event
        self.verdicts: dict[str, int] = {"allow": 0, "deny": 0}
        self.dead_letters: dict[str, int] = dict.fromkeys(get_args(DeadLetterKind), 0)
        self.policy_failures: dict[str, int] = dict.fromkeys(POLICY_FAILURE_KINDS, 0)
        self.records_refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.violations: dict[tuple[str, str], int] = {}
        self.alerts: dict[tuple[str, str], int] = {}
        self.check_seconds: dict[str, Buckets] = {}
        if engine != "unknown":
            self.check_seconds[engine] = Buckets(LATENCY_BUCKETS)
        self.verdict_latency = Buckets(VERDICT_LATENCY_BUCKETS)
        self.sessions = 0
        self.lag: dict[int, tuple[int, float]] = {}
        self.state_keys: dict[int, int] = {}
        self.heartbeat: float | None = None
        self.policies: dict[str, tuple[str, str]] = {}  # policy id -> (version, sha256)
        self.worker: tuple[str, str, str, str] | None = None
        self.runtime: Any = None  # read for rebalances, commits, aborts and the assignment
        self._rules: dict[str, str] = {}  # rule message -> its label
        self._labels: set[str] = set()  # the rule labels given out (at most MAX_RULES)
        self._rules_lock = threading.Lock()
        self.registry.register(_Collector(self))

    # -- the stream loop ------------------------------------------------------------------------

    def batch_consumed(self, events: int) -> None:
        """One batch with ``events`` events was taken from the events topic."""
        self.batches += 1
        if events > 0:
            self.events += events

    def observe_verdict(self, verdict: Verdict, eval_seconds: float | None = None,
                        engine: str | None = None) -> None:
        """A verdict was published: count it and its violations; record the check's latency.

        ``eval_seconds`` defaults to ``verdict.eval_ms / 1000``. Call it for checked batches only:
        a verdict repeated for a redelivered batch goes to :meth:`duplicate_batch`.
        """
        self.verdicts[verdict.decision] = self.verdicts.get(verdict.decision, 0) + 1
        if verdict.violations:
            counts = self.violations
            for v in verdict.violations:
                key = (self._rule(v.message), v.severity)
                counts[key] = counts.get(key, 0) + 1
        seconds = verdict.eval_ms / 1000.0 if eval_seconds is None else eval_seconds
        name = engine or verdict.engine or self.engine
        buckets = self.check_seconds.get(name)
        if buckets is None:
            buckets = self.check_seconds[name] = Buckets(LATENCY_BUCKETS)
        buckets.observe(seconds if seconds > 0.0 else 0.0)

    def observe_verdict_latency(self, seconds: float) -> None:
        """A new verdict was produced ``seconds`` after its event record's Kafka timestamp (a
        producer's clock ahead of the worker's counts as 0)."""
        self.verdict_latency.observe(seconds if seconds > 0.0 else 0.0)

    def alert_published(self, alert: Alert | Violation) -> None:
        """An alert went to the alerts topic."""
        key = (self._rule(alert.message), alert.severity)
        self.alerts[key] = self.alerts.get(key, 0) + 1

    def duplicate_batch(self) -> None:
        """A redelivered batch (known ``batch_id``) got its earlier verdict again."""
        self.duplicates += 1

    def dead_letter(self, kind: DeadLetterKind | str) -> None:
        """A record went to the dead-letter topic (``not_json``, ``invalid``, ``too_large``, ...)."""
        self.dead_letters[kind] = self.dead_letters.get(kind, 0) + 1

    def policy_failure(self, kind: str) -> None:
        """A policy check failed: ``error`` (it raised) or ``timeout`` (it overran its budget)."""
        if kind not in POLICY_FAILURE_KINDS:
            raise ValueError(f"policy failure kind must be one of {POLICY_FAILURE_KINDS}, got {kind!r}")
        self.policy_failures[kind] += 1

    def policy_record_refused(self, reason: str) -> None:
        """A policy registry record was refused (``invalid``, ``signature``, ``unsafe``, ``stale``);
        called from the registry follower's thread."""
        with self._rules_lock:
            self.records_refused[reason] = self.records_refused.get(reason, 0) + 1

    # -- state ----------------------------------------------------------------------------------

    def set_sessions(self, count: int) -> None:
        """How many sessions this worker holds in its table right now."""
        self.sessions = count

    def set_consumer_lag(self, partition: int, records: int, seconds: float = 0.0) -> None:
        """An events partition's lag as this worker sees it: records not yet processed, and how
        old the last processed record is while any wait (see :meth:`monitor.runtime.Runtime.lag`)."""
        self.lag[partition] = (max(0, records), max(0.0, seconds))

    def set_state_keys(self, sizes: Mapping[int, int]) -> None:
        """Keys of the state table per partition (:meth:`monitor.changelog.ChangelogTable.sizes`)."""
        self.state_keys = dict(sizes)

    def forget_partitions(self, partitions: Iterable[int] | None = None) -> None:
        """Drop the series of partitions revoked in a rebalance (all when ``None``)."""
        if partitions is None:
            self.lag, self.state_keys = {}, {}
            return
        gone = set(partitions)
        # replaced, never changed in place: the scrape may be reading the old dicts
        self.lag = {p: v for p, v in self.lag.items() if p not in gone}
        self.state_keys = {p: v for p, v in self.state_keys.items() if p not in gone}

    def beat(self, now: float | None = None) -> None:
        """The loop is alive (called on every tick)."""
        self.heartbeat = time.time() if now is None else now

    def set_policy(self, policy_id: str | None, policy_sha256: str | None,
                   version: str = FILE_POLICY_VERSION) -> None:
        """The version of ``policy_id`` now active (at start or after a reload): one series per
        policy, its ``version`` and ``policy_sha256`` labels replaced."""
        self.policies = {**self.policies, policy_id or "": (version, policy_sha256 or "")}

    def set_worker(self, worker_id: str, guarantee: str, version: str) -> None:
        """Who this worker is, for ``agent_monitor_worker_info``."""
        self.worker = (worker_id, self.engine, guarantee, version)

    def attach_runtime(self, runtime: Any) -> None:
        """Read rebalances, commits, aborts and the assignment from ``runtime`` at each scrape
        (plain numbers the runtime keeps anyway: nothing is added to its loop)."""
        self.runtime = runtime

    # -- reading back ---------------------------------------------------------------------------

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0.0 when absent); for tests and the CLI.

        ``name`` is the sample name: ``agent_monitor_verdicts_total``, ``agent_monitor_sessions``,
        ``agent_monitor_check_seconds_count``...
        """
        got = self.registry.get_sample_value(name, labels)
        return 0.0 if got is None else float(got)

    def _rule(self, message: str) -> str:
        # rule messages come from the policy (a bounded set), but cap label length and count anyway:
        # a policy that formats values into its messages must not explode the series count
        rule = self._rules.get(message)
        if rule is not None:
            return rule
        label = " ".join(message.split())[:MAX_RULE_LABEL] or "(empty)"
        with self._rules_lock:
            if label not in self._labels:
                if len(self._labels) >= MAX_RULES:
                    label = OTHER_RULE
                else:
                    self._labels.add(label)
            if len(self._rules) < RULE_MEMO:  # the memo of messages seen stays bounded too
                self._rules[message] = label
        return label


class _Collector:
    """Turns a :class:`WorkerMetrics` into samples when /metrics is scraped."""

    def __init__(self, m: WorkerMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        fam: dict[str, Any] = {}

        def family(name: str) -> Any:
            kind, labels, doc = METRICS[name]
            cls = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                   "histogram": HistogramMetricFamily}[kind]
            fam[name] = f = cls(name, doc, labels=list(labels))
            return f

        family("agent_monitor_batches_total").add_metric([], m.batches)
        family("agent_monitor_events_total").add_metric([], m.events)
        f = family("agent_monitor_verdicts_total")
        for decision, n in sorted(dict(m.verdicts).items()):
            f.add_metric([decision], n)
        family("agent_monitor_duplicate_batches_total").add_metric([], m.duplicates)
        for name, counts in (("agent_monitor_violations_total", m.violations),
                             ("agent_monitor_alerts_total", m.alerts)):
            f = family(name)
            for (rule, severity), n in sorted(dict(counts).items()):
                f.add_metric([rule, severity], n)
        for name, by_kind in (("agent_monitor_dead_letters_total", m.dead_letters),
                              ("agent_monitor_policy_failures_total", m.policy_failures),
                              ("agent_monitor_policy_records_refused_total", m.records_refused)):
            f = family(name)
            for kind, n in sorted(dict(by_kind).items()):
                f.add_metric([kind], n)
        f = family("agent_monitor_check_seconds")
        for engine, buckets in sorted(dict(m.check_seconds).items()):
            f.add_metric([engine], buckets.cumulative(), buckets.sum)
        family("agent_monitor_verdict_latency_seconds").add_metric(
            [], m.verdict_latency.cumulative(), m.verdict_latency.sum)
        family("agent_monitor_sessions").add_metric([], m.sessions)
        records, seconds = family("agent_monitor_consumer_lag_records"), family("agent_monitor_consumer_lag_seconds")
        for p, (behind, age) in sorted(dict(m.lag).items()):
            records.add_metric([str(p)], behind)
            seconds.add_metric([str(p)], age)
        f = family("agent_monitor_state_keys")
        for p, n in sorted(dict(m.state_keys).items()):
            f.add_metric([str(p)], n)
        rt = m.runtime
        family("agent_monitor_assigned_partitions").add_metric([], len(rt.assignment) if rt else 0)
        family("agent_monitor_rebalances_total").add_metric([], rt.rebalances if rt else 0)
        family("agent_monitor_commits_total").add_metric([], rt.commits if rt else 0)
        family("agent_monitor_transaction_aborts_total").add_metric([], rt.aborts if rt else 0)
        f = family("agent_monitor_heartbeat_timestamp_seconds")
        if m.heartbeat is not None:
            f.add_metric([], m.heartbeat)
        f = family("agent_monitor_policy_info")
        for policy_id, (version, sha) in sorted(m.policies.items()):
            f.add_metric([policy_id, version, sha], 1)
        f = family("agent_monitor_worker_info")
        if m.worker is not None:
            f.add_metric(list(m.worker), 1)
        # a family without samples would still print its HELP and TYPE: leave it out
        return iter([f for f in fam.values() if f.samples])


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
    httpd = _capped_server(max_connections)((host, port), _metrics_handler(registry, expected, timeout))
    thread = threading.Thread(target=httpd.serve_forever, name="agent-monitor-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


def _metrics_handler(registry: CollectorRegistry, expected: bytes | None,
                     request_timeout: float) -> type[BaseHTTPRequestHandler]:
    """:func:`serve_metrics`' requests: ``/metrics`` (with ``Authorization: <expected>`` when
    that is set) and ``/healthz``; a socket idle for ``request_timeout`` seconds is dropped."""

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
            encoder, content_type = choose_encoder(self.headers.get("Accept") or "")
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

    return Handler


def _capped_server(max_connections: int) -> type[ThreadingHTTPServer]:
    """A threading HTTP server serving at most ``max_connections`` at once (one more is closed
    at once)."""
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

    return Server
