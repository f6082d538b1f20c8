"""The README's pictures: ``agent-monitor top`` and a Prometheus graph of dashboard queries, both from a
real worker under load (no Grafana can be installed here to show the dashboard itself).

A broker (``$KAFKA_BOOTSTRAP_SERVERS`` or one started from Kafka's jars), a worker with /metrics
and a token, Prometheus (Debian's package, deploy/prometheus.yml via
``deploy.local.prometheus_server``) scraping it every 2 s, and about ``--seconds`` of the live
benchmark's agent traffic at a rate that rises and falls. Then:

- ``docs/top.png``: one frame of ``agent-monitor top`` recorded by rich as SVG, rendered to PNG by
  headless Chromium;
- ``docs/prometheus-graph.png``: Prometheus' own graph page with the dashboard's "Verdicts by
  decision" and "Verdict latency" p99 queries, screenshot by headless Chromium.

Run: ``.venv/bin/python docs/pictures.py [--seconds 90]`` (needs ``make prometheus`` and
``make browser``); everything it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LOCAL_POLICY", "1")

from traffic import POLICY, Sessions, producer  # noqa: E402

from deploy.local.prometheus_server import PrometheusServer, local_config  # noqa: E402

CHROMIUM = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int = 0) -> None:
    args = [*CHROMIUM, f"--window-size={width},{height}", f"--screenshot={out}"]
    if wait_ms:
        args.append(f"--virtual-time-budget={wait_ms}")
    subprocess.run([*args, url], check=True, capture_output=True, timeout=120)
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {out}")


def play(bootstrap: str, topic: str, seconds: float) -> int:
    """Agent traffic for ``seconds``: 50 batches/s rising to 250 and back, a bad record now and then.
    Six sets of 100 sessions take turns, each set at another turn of its 6, so that some sessions
    are always at the turn where a quarter of them (having asked to "send") call send_email, which
    the flow rule denies; a set that has taken its 6 turns is followed by a new one."""
    sets = [Sessions(100, risky_every=4) for _ in range(6)]
    for k, s in enumerate(sets):
        s.turns = [k] * s.count  # staggered (the first sets start late in their sessions)
    p = producer(bootstrap)
    sent = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        rate = 50 + 200 * max(0.0, 1 - abs(2 * elapsed / seconds - 1))
        for _ in range(max(1, int(rate / 10))):
            k = sent % len(sets)
            if sets[k].turns[sets[k].next] >= 6:
                sets[k] = Sessions(100, risky_every=4)
            b = sets[k].batch()
            p.produce(topic, key=b.session_id.encode(), value=b.value)
            sent += 1
        if int(elapsed) % 20 == 0 and int(elapsed * 10) % 10 == 0:
            p.produce(topic, key=b"agent-7", value=b"{truncated")
        p.poll(0)
        time.sleep(0.1)
    p.flush(30)
    return sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="seconds of traffic (default 90)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder of the PNGs (default docs/)")
    args = ap.parse_args(argv)

    from monitor.broker import LocalBroker, free_port
    from monitor.config import WorkerSettings
    from monitor.topics import create_topics
    from monitor.worker_process import WorkerProcess

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="agent-monitor-pictures-"))
    token = secrets.token_hex(16)
    os.environ["AGENT_MONITOR_METRICS_TOKEN"] = token
    (work / "token").write_text(token)
    (work / "flow.gr").write_text(POLICY)
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalBroker(heap="768m").start(timeout=180)
        bootstrap = broker.bootstrap_servers
    prefix = f"pictures-{secrets.token_hex(3)}"
    port, prom_port = free_port(), free_port()
    try:
        create_topics(bootstrap, prefix, partitions_override=6)
        worker = WorkerProcess(WorkerSettings(bootstrap_servers=bootstrap, topic_prefix=prefix,
                                              policy_path=str(work / "flow.gr"), partitions=6, metrics_port=port,
                                              worker_id="worker-1"), log_path=work / "worker.log")
        with worker, PrometheusServer(
                local_config([f"127.0.0.1:{port}"], work / "token", interval="2s",
                             self_target=f"127.0.0.1:{prom_port}"), work / "prometheus", port=prom_port) as prom:
            sent: list[int] = []
            player = threading.Thread(target=lambda: sent.append(play(bootstrap, worker.settings.topics.events,
                                                                      args.seconds)))
            player.start()
            time.sleep(args.seconds * 0.6)  # past the peak: the frame shows traffic, and some lag
            top_png(f"http://127.0.0.1:{port}/metrics", token, out / "top.png", work)
            player.join()
            print(f"played {sent[0]} batches", flush=True)
            time.sleep(6)  # the last verdicts scraped
            graph_png(prom, out / "prometheus-graph.png", args.seconds)
    finally:
        if broker is not None:
            broker.stop()
    for name in ("top.png", "prometheus-graph.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size:,} bytes)")
    return 0


def top_png(url: str, token: str, out: Path, work: Path) -> None:
    """One frame of ``agent-monitor top``: two scrapes 2 s apart, drawn as ``top --once`` draws it."""
    from rich.console import Console

    from monitor.top import compute, render, scrape_all

    first = scrape_all([url], token)
    time.sleep(2)
    second = scrape_all([url], token)
    console = Console(record=True, width=118, file=open(os.devnull, "w"), force_terminal=True,
                      color_system="truecolor")
    console.print(render(compute(first, second)))
    svg = work / "top.svg"
    console.save_svg(str(svg), title="agent-monitor top")
    width, height = (float(x) for x in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text()).groups())
    screenshot(svg.as_uri(), out, int(width) + 2, int(height) + 2)


def graph_png(prom: PrometheusServer, out: Path, seconds: float) -> None:
    """Prometheus' graph page (its classic UI in Debian's 2.42) with two of the dashboard's queries."""
    exprs = ["sum by (decision) (rate(agent_monitor_verdicts_total[30s]))",
             "histogram_quantile(0.99, sum by (le) (rate(agent_monitor_verdict_latency_seconds_bucket[30s])))"]
    for expr in exprs:
        if not prom.query(expr):
            raise RuntimeError(f"no data for {expr}")
    minutes = max(2, int(seconds // 60) + 1)
    params: dict[str, str] = {}
    for i, expr in enumerate(exprs):
        params.update({f"g{i}.expr": expr, f"g{i}.tab": "0", f"g{i}.range_input": f"{minutes}m",
                       f"g{i}.stacked": "0"})
    screenshot(f"{prom.url}/classic/graph?{urllib.parse.urlencode(params)}", out, 1200, 1560, wait_ms=8000)


if __name__ == "__main__":
    sys.exit(main())
