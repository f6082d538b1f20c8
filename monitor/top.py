"""``agent-monitor top``: a live terminal view of workers, read from their Prometheus ``/metrics``.

Each refresh scrapes every worker (in parallel, with the bearer token) and shows, over the time
since the previous scrape: throughput (batches, events, verdicts per second), the deny rate,
produce→verdict latency percentiles (from the histogram's buckets, as Prometheus'
``histogram_quantile`` computes them), the rules with the most violations, and lag per partition;
with totals of dead letters and policy failures. ``--once`` scrapes twice, ``--interval`` apart,
and prints one frame.

Every string that comes from a worker (rule messages, which a policy may build from what an agent
sent, worker ids, label values) is shown with its control and format characters escaped, so no
terminal escape sequence from an agent reaches the screen.

Example (a worker with ``--metrics-port 9464``; the token from ``$AGENT_MONITOR_METRICS_TOKEN``)::

    agent-monitor top --url 127.0.0.1:9464 --url 127.0.0.1:9465
    agent-monitor top --url http://worker-1:9464/metrics --token-file /run/secrets/metrics_token --once

From Python::

    >>> frame = compute(None, {"w": Scrape("w", 0.0, {}, error="connection refused")})
    >>> frame.workers[0].error
    'connection refused'
"""

from __future__ import annotations

import math
import os
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from monitor.metrics import TOKEN_ENV

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]

DEFAULT_URL = "http://127.0.0.1:9464/metrics"
LATENCY = "agent_monitor_verdict_latency_seconds_bucket"
CHECK = "agent_monitor_check_seconds_bucket"


def printable(text: str) -> str:
    r"""``text`` with every control, format, surrogate, private-use or unassigned character (and line
    or paragraph separator) written as a Python escape: what a terminal shows, never obeys.

    >>> printable("Leak \x1b[2J in \u202egnp.exe\u202c")
    'Leak \\x1b[2J in \\u202egnp.exe\\u202c'
    >>> printable("Secret in bash command [risk=medium] ✓")
    'Secret in bash command [risk=medium] ✓'
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" or cat in ("Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def metrics_url(text: str) -> str:
    """A worker's /metrics URL from ``host:port`` or a URL (``/metrics`` added when it has no path).

    >>> metrics_url("127.0.0.1:9464"), metrics_url("https://w1:9464"), metrics_url("http://w/x/metrics")
    ('http://127.0.0.1:9464/metrics', 'https://w1:9464/metrics', 'http://w/x/metrics')
    """
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected HOST:PORT or an http(s) URL, got {text!r}")
    return urllib.parse.urlunsplit(parts._replace(path=parts.path if parts.path not in ("", "/") else "/metrics"))


# -- scraping ---------------------------------------------------------------------------------------

@dataclass
class Scrape:
    """One worker's samples at one moment (``at``: a monotonic clock), or why there are none."""

    url: str
    at: float
    samples: Samples
    error: str | None = None

    def values(self, name: str) -> list[tuple[Labels, float]]:
        return self.samples.get(name, [])

    def total(self, name: str, **match: str) -> float:
        return sum(v for labels, v in self.values(name) if all(labels.get(k) == x for k, x in match.items()))

    def label(self, name: str, key: str) -> str | None:
        for labels, _ in self.values(name):
            return labels.get(key)
        return None


def scrape(url: str, token: str | None = None, timeout: float = 5.0) -> Scrape:
    """Read one worker's /metrics; a failure is a :class:`Scrape` with ``error`` set, never an exception."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    at = time.monotonic()
    try:
        # (the operator's --url, made http:// by metrics_url when it names no scheme)
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:  # noqa: S310
            text = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        hint = " (wrong or missing token: --token, --token-file or $AGENT_MONITOR_METRICS_TOKEN)" \
            if exc.code == 401 else ""
        return Scrape(url, at, {}, error=f"HTTP {exc.code}{hint}")
    except (OSError, ValueError) as exc:
        return Scrape(url, at, {}, error=str(getattr(exc, "reason", None) or exc))
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except ValueError as exc:
        return Scrape(url, at, {}, error=f"not Prometheus text: {exc}")
    if not any(name.startswith("agent_monitor_") for name in samples):
        return Scrape(url, at, {}, error="no agent_monitor_ metrics here (is it a worker's /metrics?)")
    return Scrape(url, at, samples)


def scrape_all(urls: Sequence[str], token: str | None, timeout: float = 5.0) -> dict[str, Scrape]:
    """Every worker at once: one that does not answer delays the frame by ``timeout`` at most."""
    with ThreadPoolExecutor(max_workers=min(16, len(urls)) or 1) as pool:
        return dict(zip(urls, pool.map(lambda u: scrape(u, token, timeout), urls), strict=False))


# -- what a frame shows -----------------------------------------------------------------------------

def increase(cur: float, prev: float | None) -> float:
    """A counter's increase; a worker that restarted (its counter went down) counts from zero."""
    if prev is None:
        return 0.0
    return cur - prev if cur >= prev else cur


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile``'s answer for cumulative ``buckets`` (upper bound -> count), or None.

    >>> quantile(0.5, {0.1: 10, 0.2: 20, math.inf: 20})
    0.1
    >>> round(quantile(0.99, {0.1: 0, 1.0: 100, math.inf: 100}), 6)
    0.991
    >>> quantile(0.99, {0.1: 1, math.inf: 5}), quantile(0.9, {0.1: 0, math.inf: 0})
    (0.1, None)
    """
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    below, lower = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:  # past the last finite bound: that bound is all one can say
                return bounds[-2] if len(bounds) > 1 else None
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return None


def buckets(scrape: Scrape, name: str, prev: Scrape | None = None, **match: str) -> dict[float, float]:
    """A histogram's cumulative buckets (upper bound -> count) in ``scrape``, summed over the label
    sets that ``match``; with ``prev``, what was added since. A sample without a numeric ``le`` is
    left out."""

    def summed(of: Scrape) -> dict[float, float]:
        out: dict[float, float] = {}
        for labels, v in of.values(name):
            if all(labels.get(k) == x for k, x in match.items()):
                try:
                    bound = float(labels["le"])
                except (KeyError, ValueError):
                    continue
                out[bound] = out.get(bound, 0.0) + v
        return out

    now = summed(scrape)
    if prev is None:
        return now
    before = summed(prev)
    return {k: increase(v, before.get(k, 0.0)) for k, v in now.items()}


def _merge(into: dict[float, float], more: dict[float, float]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0.0) + v


@dataclass
class WorkerRow:
    """One worker (or, as ``name="all"``, every worker) in a frame; rates are None before a second scrape."""

    name: str
    error: str | None = None
    partitions: int = 0
    batches_s: float | None = None
    events_s: float | None = None
    verdicts_s: float | None = None
    deny_ratio: float | None = None
    latency: tuple[float | None, float | None, float | None] = (None, None, None)
    latency_lifetime: bool = False  # no verdict in the interval: percentiles since the worker started
    check_p99: float | None = None
    lag_records: int = 0
    lag_seconds: float = 0.0
    sessions: int = 0
    heartbeat_age: float | None = None


@dataclass
class Frame:
    """Everything one refresh shows; :func:`render` draws it."""

    at: datetime
    seconds: float | None  # since the previous scrape (None: the first one)
    workers: list[WorkerRow]
    total: WorkerRow
    rules: list[tuple[str, str, float | None, float]] = field(default_factory=list)  # rule, severity, /s, total
    partitions: list[tuple[int, str, int, float, int | None]] = field(default_factory=list)
    dead_letters: dict[str, float] = field(default_factory=dict)  # kind -> total
    policy_failures: dict[str, float] = field(default_factory=dict)  # kind -> total


def _by_partition(scrape: Scrape, name: str) -> dict[int, float]:
    """A per-partition gauge; a sample whose partition is no number is left out, never fatal."""
    out = {}
    for labels, v in scrape.values(name):
        part = labels.get("partition", "")
        if part.isdigit():
            out[int(part)] = v
    return out


def _percentiles(buckets: dict[float, float]) -> tuple[float | None, float | None, float | None]:
    return quantile(0.5, buckets), quantile(0.95, buckets), quantile(0.99, buckets)


def compute(prev: dict[str, Scrape] | None, cur: dict[str, Scrape], rules: int = 10,
            now: datetime | None = None) -> Frame:
    """A frame from two rounds of scrapes (``prev`` None: totals only, no rates)."""
    prev = prev or {}
    rows: list[WorkerRow] = []
    total = WorkerRow("all")
    spans: list[float] = []
    all_latency: dict[float, float] = {}
    all_lifetime: dict[float, float] = {}
    all_checks: dict[float, float] = {}
    rule_rates: dict[tuple[str, str], float] = {}
    rule_totals: dict[tuple[str, str], float] = {}
    parts: list[tuple[int, str, int, float, int | None]] = []
    dead: dict[str, float] = {}
    failures: dict[str, float] = {}
    counters = {"batches_s": "agent_monitor_batches_total", "events_s": "agent_monitor_events_total",
                "verdicts_s": "agent_monitor_verdicts_total"}
    sums = dict.fromkeys(counters, 0.0)
    deny_sum = decided_sum = 0.0
    for url, s in cur.items():
        name = s.label("agent_monitor_worker_info", "worker_id") or urllib.parse.urlsplit(url).netloc or url
        row = WorkerRow(name, error=s.error)
        rows.append(row)
        if s.error:
            continue
        p = prev.get(url)
        p = p if p is not None and not p.error else None
        row.partitions = int(s.total("agent_monitor_assigned_partitions"))
        row.sessions = int(s.total("agent_monitor_sessions"))
        lags = _by_partition(s, "agent_monitor_consumer_lag_records")
        ages = _by_partition(s, "agent_monitor_consumer_lag_seconds")
        keys = {part: int(v) for part, v in _by_partition(s, "agent_monitor_state_keys").items()}
        row.lag_records = int(sum(lags.values()))
        row.lag_seconds = max(ages.values(), default=0.0)
        for part, behind in lags.items():
            parts.append((part, name, int(behind), ages.get(part, 0.0), keys.get(part)))
        beat = s.samples.get("agent_monitor_heartbeat_timestamp_seconds")
        if beat:
            row.heartbeat_age = max(0.0, time.time() - beat[0][1])
        for labels, v in s.values("agent_monitor_dead_letters_total"):
            dead[labels.get("kind", "?")] = dead.get(labels.get("kind", "?"), 0.0) + v
        for labels, v in s.values("agent_monitor_policy_failures_total"):
            failures[labels.get("kind", "?")] = failures.get(labels.get("kind", "?"), 0.0) + v
        for labels, v in s.values("agent_monitor_violations_total"):
            key = (labels.get("rule", ""), labels.get("severity", ""))
            rule_totals[key] = rule_totals.get(key, 0.0) + v
        lifetime = buckets(s, LATENCY, None)
        _merge(all_lifetime, lifetime)
        if p is None:
            row.latency, row.latency_lifetime = _percentiles(lifetime), True
            row.check_p99 = quantile(0.99, buckets(s, CHECK, None))
            continue
        span = max(1e-6, s.at - p.at)
        spans.append(span)
        for attr, metric in counters.items():
            got = increase(s.total(metric), p.total(metric))
            setattr(row, attr, got / span)
            sums[attr] += got / span
        decided = increase(s.total("agent_monitor_verdicts_total"), p.total("agent_monitor_verdicts_total"))
        denied = increase(s.total("agent_monitor_verdicts_total", decision="deny"),
                          p.total("agent_monitor_verdicts_total", decision="deny"))
        deny_sum += denied
        decided_sum += decided
        row.deny_ratio = denied / decided if decided else None
        window = buckets(s, LATENCY, p)
        _merge(all_latency, window)
        if window.get(math.inf, 0.0) > 0:
            row.latency = _percentiles(window)
        else:
            row.latency, row.latency_lifetime = _percentiles(lifetime), True
        checks = buckets(s, CHECK, p)
        _merge(all_checks, checks)
        row.check_p99 = quantile(0.99, checks)
        before = {(lb.get("rule", ""), lb.get("severity", "")): v for lb, v in p.values("agent_monitor_violations_total")}
        for labels, v in s.values("agent_monitor_violations_total"):
            key = (labels.get("rule", ""), labels.get("severity", ""))
            rule_rates[key] = rule_rates.get(key, 0.0) + increase(v, before.get(key, 0.0)) / span
    live = [r for r in rows if not r.error]
    total.partitions = sum(r.partitions for r in live)
    total.sessions = sum(r.sessions for r in live)
    total.lag_records = sum(r.lag_records for r in live)
    total.lag_seconds = max((r.lag_seconds for r in live), default=0.0)
    heartbeat_ages = [r.heartbeat_age for r in live if r.heartbeat_age is not None]
    total.heartbeat_age = max(heartbeat_ages) if heartbeat_ages else None
    if spans:
        for attr in counters:
            setattr(total, attr, sums[attr])
        total.deny_ratio = deny_sum / decided_sum if decided_sum else None
        total.check_p99 = quantile(0.99, all_checks)
    if all_latency.get(math.inf, 0.0) > 0:
        total.latency = _percentiles(all_latency)
    else:
        total.latency, total.latency_lifetime = _percentiles(all_lifetime), True
    ranked = sorted(rule_totals, key=lambda k: (-(rule_rates.get(k) or 0.0), -rule_totals[k], k))
    return Frame(
        at=now or datetime.now().astimezone(),
        seconds=sum(spans) / len(spans) if spans else None,
        workers=rows, total=total,
        rules=[(r, sev, rule_rates.get((r, sev)) if spans else None, rule_totals[(r, sev)])
               for r, sev in ranked[:rules]],
        partitions=sorted(parts, key=lambda x: (x[0], x[1])),
        dead_letters=dead, policy_failures=failures,
    )


# -- drawing ----------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _duration(seconds: float | None) -> str:
    """Seconds for a person.

    >>> _duration(0.00042), _duration(0.0123), _duration(2.5), _duration(None)
    ('420 µs', '12.3 ms', '2.50 s', '–')
    """
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _rate(per_second: float | None) -> str:
    """Events or batches a second.

    >>> _rate(3.14159), _rate(2283.4)
    ('3.1', '2,283')
    """
    return _num(per_second, 1 if per_second is not None and per_second < 100 else 0)


def _age(seconds: float | None) -> str:
    """A lag or an age, coarse: it changes every second.

    >>> _age(0), _age(0.42), _age(75), _age(None)
    ('0', '0.4 s', '1.2 m', '–')
    """
    if seconds is None:
        return "–"
    if not seconds:
        return "0"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} m"


def _percent(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio * 100:.1f}%"


def _t(text: str, style: str = "") -> Text:
    """Remote text as rich Text: escaped, and never read as markup."""
    from rich.text import Text

    return Text(printable(text), style=style)


SEVERITY_STYLE = {"low": "blue", "medium": "yellow", "high": "red", "critical": "bold red"}


def render(frame: Frame, max_partitions: int = 24) -> RenderableType:
    """The frame as rich renderables: a header, workers, top rules, lag per partition, failures."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    up = sum(1 for w in frame.workers if not w.error)
    header = Text()
    header.append("agent-monitor top", style="bold")
    header.append(f"  {up}/{len(frame.workers)} workers up  ")
    header.append(f"{frame.at:%Y-%m-%d %H:%M:%S}", style="dim")
    if frame.seconds is None:
        header.append("  (rates from the next refresh)", style="dim")
    else:
        header.append(f"  rates over {frame.seconds:.1f} s", style="dim")

    workers = Table(title="Workers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    workers.add_column("worker", no_wrap=True, overflow="ellipsis", max_width=28)
    for name in ("parts", "batch/s", "event/s", "deny", "p50", "p95", "p99", "chk p99", "lag", "behind",
                 "sessions", "beat"):
        workers.add_column(name, justify="right", no_wrap=True)
    live = [w for w in frame.workers if not w.error]
    for row in [*live, frame.total] if len(live) > 1 else live:
        style = "bold" if row is frame.total else ""
        lat_style = "dim" if row.latency_lifetime else ""
        workers.add_row(
            _t(row.name, style), _num(row.partitions), _rate(row.batches_s), _rate(row.events_s),
            Text(_percent(row.deny_ratio), style="red" if (row.deny_ratio or 0) >= 0.25 else ""),
            *(Text(_duration(v), style=lat_style) for v in row.latency), _duration(row.check_p99),
            _num(row.lag_records), _age(row.lag_seconds), _num(row.sessions),
            Text(_age(row.heartbeat_age), style="red" if (row.heartbeat_age or 0) > 60 else ""))
    parts: list[RenderableType] = [header, workers]
    for row in frame.workers:
        if row.error:
            parts.append(_t(f"✗ {row.name}: {row.error}", "red"))
    if any(w.latency_lifetime for w in live):
        parts.append(Text("dim percentiles: no verdict in the interval, since the worker started", style="dim"))

    rules = Table(title="Top rules", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    rules.add_column("severity", no_wrap=True)
    rules.add_column("rule", overflow="ellipsis", max_width=90)
    rules.add_column("violations/s", justify="right", no_wrap=True)  # over the interval
    rules.add_column("total", justify="right", no_wrap=True)
    for rule, severity, rate, count in frame.rules:
        rules.add_row(_t(severity, SEVERITY_STYLE.get(severity, "")), _t(rule), _rate(rate), _num(count))
    if not frame.rules:
        rules.add_row("", Text("no violations yet", style="dim"), "", "")
    parts.append(rules)

    lag = Table(title="Lag per partition", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("partition", "right"), ("worker", "left"), ("records", "right"),
                          ("behind", "right"), ("state keys", "right")):
        lag.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    # the partitions most behind first when they do not all fit
    shown = sorted(frame.partitions, key=lambda x: (-x[2], -x[3], x[0]))[:max_partitions]
    for part, worker, records, seconds, keys in sorted(shown, key=lambda x: (x[0], x[1])):
        lag.add_row(str(part), _t(worker), Text(_num(records), style="yellow" if records else ""),
                    _age(seconds), _num(keys))
    if len(frame.partitions) > len(shown):
        lag.add_row("", Text(f"… {len(frame.partitions) - len(shown)} more, all caught up or less behind",
                             style="dim"), "", "", "")
    parts.append(lag)

    foot = Text()
    for title, counts in (("dead letters", frame.dead_letters), ("policy failures", frame.policy_failures)):
        foot.append(f"{title} ", style="bold")
        for kind, count in sorted(counts.items()):
            name = printable(kind) + (" (budget overrun)" if title == "policy failures" and kind == "timeout" else "")
            foot.append(f"{name} {_num(count)}  ", style="red" if count else "")
        if not counts:
            foot.append("–")
        foot.append("\n" if title == "dead letters" else "")
    parts.append(foot)
    return Group(*parts)


# -- the command ------------------------------------------------------------------------------------

def read_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """``token``, else the first line of ``token_file``, else ``$AGENT_MONITOR_METRICS_TOKEN``."""
    if token:
        return token
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            return f.readline().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def run_top(urls: Iterable[str], token: str | None, console: Console, interval: float = 2.0,
            once: bool = False, rules: int = 10, timeout: float = 5.0, max_partitions: int = 24) -> int:
    """Show the workers until Ctrl-C (``once``: one frame after two scrapes ``interval`` apart).

    Returns 0, or 1 when ``once`` and no worker could be read.
    """
    urls = list(urls)
    prev = scrape_all(urls, token, timeout)
    if once:
        time.sleep(interval)
        cur = scrape_all(urls, token, timeout)
        console.print(render(compute(prev, cur, rules), max_partitions))
        return 0 if any(not s.error for s in cur.values()) else 1
    from rich.live import Live

    with Live(render(compute(None, prev, rules), max_partitions), console=console, auto_refresh=False,
              screen=console.is_terminal) as live:
        try:
            while True:
                time.sleep(interval)
                cur = scrape_all(urls, token, timeout)
                live.update(render(compute(prev, cur, rules), max_partitions), refresh=True)
                prev = cur
        except KeyboardInterrupt:
            pass
    return 0
