"""agent-monitor top against real /metrics endpoints (monitor.metrics.serve_metrics with a token):
rates over two scrapes, latency percentiles as Prometheus computes them, workers that are down or
refuse the token, and agent-chosen strings that must never reach the terminal as control codes.
tests/metrics/test_prometheus.py runs it against a real worker too."""

from __future__ import annotations

import doctest
import io
import math

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

import monitor.top
from monitor.cli import main
from monitor.metrics import WorkerMetrics, serve_metrics
from monitor.models import Match, Verdict, Violation
from monitor.top import compute, quantile, render, scrape

TOKEN = "t0ken"
EVIL = "Leak \x1b[2J\x1b]0;pwned\x07 in \u202egnp.exe [bold red]boom[/] \u200b"


def _violation(message: str, severity_tag: str = "") -> Violation:
    return Violation.from_match(Match(rule_index=0, message=message + severity_tag, key="(0,)"), "s", "a" * 64)


def _verdicts(m: WorkerMetrics, n: int, denies: int, message: str = "No secrets [risk=critical]",
              latency: float = 0.004) -> None:
    for i in range(n):
        deny = i < denies
        m.batch_consumed(3)
        m.observe_verdict(Verdict(session_id="s", batch_id=str(i), decision="deny" if deny else "allow",
                                  engine="incremental", eval_ms=1.0,
                                  violations=[_violation(message)] if deny else []))
        m.observe_verdict_latency(latency)


@pytest.fixture
def worker():
    m = WorkerMetrics(engine="incremental")
    m.set_worker("worker-a", "at-least-once", "0.1.0")
    m.set_consumer_lag(0, 0, 0.0)
    m.set_consumer_lag(1, 42, 3.5)
    m.set_state_keys({0: 10, 1: 7})
    m.set_sessions(5)
    m.beat()
    with serve_metrics(m.registry, port=0, token=TOKEN) as srv:
        yield m, srv.url


def test_rates_deny_share_and_percentiles_over_two_scrapes(worker):
    m, url = worker
    _verdicts(m, 10, 0, latency=0.5)  # before the first scrape: not in this frame's rates
    first = scrape(url, TOKEN)
    _verdicts(m, 100, 20, latency=0.004)
    _verdicts(m, 5, 0, latency=7.0)  # 5 slow verdicts in 105: p99 falls in their bucket, p95 does not
    second = scrape(url, TOKEN)
    assert first.error is None and second.error is None
    first.at, second.at = 10.0, 12.0  # a known span
    frame = compute({url: first}, {url: second})
    (row,) = frame.workers
    assert row.name == "worker-a" and row.error is None
    assert row.batches_s == pytest.approx(105 / 2) and row.events_s == pytest.approx(315 / 2)
    assert row.deny_ratio == pytest.approx(20 / 105)
    assert not row.latency_lifetime
    p50, p95, p99 = row.latency
    assert 0.0025 < p50 <= 0.005 and 0.0025 < p95 <= 0.005  # the 4 ms bucket
    assert 5.0 < p99 <= 10.0  # the slow verdicts' bucket (5, 10]
    assert row.lag_records == 42 and row.lag_seconds == 3.5 and row.sessions == 5
    assert frame.partitions == [(0, "worker-a", 0, 0.0, 10), (1, "worker-a", 42, 3.5, 7)]
    ((rule, severity, rate, total),) = frame.rules
    assert (rule, severity) == ("No secrets [risk=critical]", "critical")
    assert rate == pytest.approx(10.0) and total == 20
    assert frame.dead_letters["not_json"] == 0 and frame.policy_failures == {"error": 0, "timeout": 0}


def test_counters_that_went_down_mean_a_restart(worker):
    m, url = worker
    _verdicts(m, 50, 10)
    before = scrape(url, TOKEN)
    restarted = WorkerMetrics(engine="incremental")
    _verdicts(restarted, 4, 1)
    with serve_metrics(restarted.registry, port=0, token=TOKEN) as srv:
        after = scrape(srv.url, TOKEN)
    before.at, after.at = 0.0, 1.0
    (row,) = compute({url: before}, {url: after}).workers
    # counted from zero, as Prometheus' rate() does: never a negative rate
    assert row.verdicts_s == 4 and row.deny_ratio == 0.25


def test_quantile_agrees_with_prometheus_on_edges():
    # (Prometheus itself computes the same buckets in tests/metrics/test_prometheus.py)
    assert quantile(0.5, {1.0: 0, 2.0: 10, math.inf: 10}) == 1.5
    assert quantile(1.0, {1.0: 10, math.inf: 10}) == 1.0
    assert quantile(0.5, {}) is None


def test_once_prints_one_frame(worker, capsys):
    m, url = worker
    _verdicts(m, 30, 3)
    code = main(["top", "--once", "--url", url.removeprefix("http://").removesuffix("/metrics"),
                 "--token", TOKEN, "--interval", "0.2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "agent-monitor top" in out and "1/1 workers up" in out
    assert "worker-a" in out and "No secrets [risk=critical]" in out
    assert "Lag per partition" in out and "42" in out
    assert "dead letters" in out and "budget overrun" in out


def test_a_worker_down_or_refusing_the_token_is_shown_not_fatal(worker, capsys, tmp_path, monkeypatch):
    from monitor.broker import free_port

    monkeypatch.delenv("AGENT_MONITOR_METRICS_TOKEN", raising=False)
    m, url = worker
    dead = f"127.0.0.1:{free_port()}"
    # no token: the worker refuses, the other does not answer: nothing could be read
    assert main(["top", "--once", "--url", url, "--url", dead, "--interval", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "0/2 workers up" in out and "HTTP 401 (wrong or missing token" in out
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert main(["top", "--once", "--url", url, "--url", dead, "--token-file", str(token_file),
                 "--interval", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1/2 workers up" in out and f"✗ {dead}: " in out and "worker-a" in out
    # the token from the environment; a wrong one is refused
    monkeypatch.setenv("AGENT_MONITOR_METRICS_TOKEN", TOKEN)
    assert main(["top", "--once", "--url", url, "--interval", "0.1"]) == 0
    assert "1/1 workers up" in capsys.readouterr().out
    assert main(["top", "--once", "--url", url, "--token", "wrong", "--interval", "0.1"]) == 1
    assert "HTTP 401" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["top", "--once", "--url", "ftp://x", "--interval", "0.1"])
    assert exit_.value.code == 2 and "expected HOST:PORT or an http(s) URL" in capsys.readouterr().err


def test_agent_chosen_strings_never_reach_the_terminal_as_control_codes(worker):
    m, url = worker
    _verdicts(m, 5, 5, message=EVIL)
    m.set_worker("w\x1b[31mred", "at-least-once", "0.1.0")
    first = scrape(url, TOKEN)
    second = scrape(url, TOKEN)
    frame = compute({url: first}, {url: second})
    assert frame.rules[0][0].startswith("Leak \x1b[2J")  # the data keeps what the policy raised
    buf = io.StringIO()
    # a real terminal: rich writes its own escape codes, but none of the agent's
    console = Console(file=buf, force_terminal=True, color_system="truecolor", width=200)
    console.print(render(frame))
    out = buf.getvalue()
    for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e", "\u200b", "\x1b[31mred"):
        assert raw not in out, repr(raw)
    plain = Console(file=io.StringIO(), width=200, record=True)
    plain.print(render(frame))
    text = plain.export_text()
    assert "Leak \\x1b[2J\\x1b]0;pwned\\x07 in \\u202egnp.exe [bold red]boom[/] \\u200b" in text  # markup stays text
    assert "w\\x1b[31mred" in text


def test_unreachable_or_not_a_worker(worker):
    from monitor.broker import free_port

    got = scrape(f"http://127.0.0.1:{free_port()}/metrics")
    assert got.error and not got.samples
    m, url = worker
    with serve_metrics(CollectorRegistry(), port=0, token="") as srv:
        assert "no agent_monitor_ metrics" in (scrape(srv.url).error or "")
    frame = compute(None, {url: scrape(url, TOKEN)})
    assert frame.seconds is None and frame.workers[0].batches_s is None  # no rates from one scrape
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(render(frame))
    assert "rates from the next refresh" in console.export_text()


def test_doc_examples_run():
    failed, tried = doctest.testmod(monitor.top)
    assert failed == 0 and tried > 5


def test_odd_samples_from_an_endpoint_are_left_out_not_fatal():
    from prometheus_client import Counter, Gauge

    r = CollectorRegistry()
    Gauge("agent_monitor_consumer_lag_records", "x", ["partition"], registry=r).labels(partition="p0").set(3)
    Gauge("agent_monitor_consumer_lag_records_x", "x", registry=r).set(1)
    Counter("agent_monitor_verdict_latency_seconds_bucket", "not a histogram", ["le"], registry=r).labels(
        le="soon").inc()
    with serve_metrics(r, port=0, token="") as srv:  # "": no token, whatever the environment says
        first, second = scrape(srv.url, None), scrape(srv.url, None)
    frame = compute({srv.url: first}, {srv.url: second})
    assert frame.workers[0].error is None and frame.partitions == [] and frame.workers[0].latency == (None,) * 3
    render(frame)
