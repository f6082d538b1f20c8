"""``agent-monitor demo`` (``make demo``): the whole monitor end to end on one machine.

1. a Kafka broker: ``--bootstrap-servers``, else ``KAFKA_BOOTSTRAP_SERVERS``, else the broker of
   ``agent-monitor broker start`` if it runs, else a local single-node broker started from Kafka's
   jars (fetched once by Maven);
2. topics under a fresh ``demo-...`` prefix; ``examples/policies`` published to the policy registry
   (``<prefix>.policies``), signed with a key pair made for the demo;
3. a worker subprocess (:class:`~monitor.worker_process.WorkerProcess` following the registry and
   taking only records signed by that key), awaited until it prints ``agent-monitor worker ready``;
4. every sample session (``examples/sessions``) played batch by batch with
   :meth:`MonitorClient.check_batch`, verdicts and alerts shown as they arrive;
5. a live update: a flow begins under version 1 of ``send_after_keyword``, version 2 (the rule's
   action ``log``) is published while the worker runs, and the flow's end is caught by version 2
   (allowed and logged); a rollback to version 1 denies the same flow again. No restart;
6. a summary (expected vs actual per session, totals, alerts, latency p50/p95); worker and broker
   stopped. The exit code is 0 only if every verdict met its expectation.

Example (starts a broker and a worker; about a minute)::

    from monitor.demo import run_demo
    raise SystemExit(run_demo())
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from monitor.config import WorkerSettings
from monitor.console import DECISION_STYLE, make_console, printable, render_alert, render_verdict
from monitor.models import Alert, Verdict
from monitor.policy import parse_policies
from monitor.samples import Expectation, SampleSession, load_sample, load_samples
from monitor.worker_process import REPO, WorkerProcess

if TYPE_CHECKING:
    from rich.console import Console

    from monitor.client import MonitorClient
    from monitor.registry import Registry

EXAMPLES = REPO / "examples"
DEMO_PARTITIONS = 6

# -- the demo -------------------------------------------------------------------------------------

class PlayedBatch(BaseModel):
    """One batch of a sample as the demo played it: what it expected, got, and how fast."""

    sample: str
    session_id: str
    batch_id: str
    expected: Expectation
    verdict: Verdict | None = None
    problem: str | None = None
    latency_ms: float | None = None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def _load_sessions(path: Path) -> list[SampleSession]:
    return [load_sample(path)] if path.is_file() else load_samples(path)


def _served_ids(policy_path: Path) -> set[str]:
    """The policy ids a worker serving ``policy_path`` answers to (file stems, and a folder's name
    for all files combined)."""
    ids = {p.policy_id for p in parse_policies(policy_path)}
    if policy_path.is_dir():
        ids.add(policy_path.name)
    return ids


def _resolve_broker(bootstrap: str | None, keep: bool, console: Console) -> tuple[str, Any]:
    """The cluster to use and, if the demo started one, the thing to stop afterwards."""
    from monitor import broker as broker_mod

    if bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return bootstrap or os.environ["KAFKA_BOOTSTRAP_SERVERS"], None
    running = broker_mod.daemon_status()
    if running:
        console.print(f"using the running local broker at {running.bootstrap_servers} (agent-monitor broker start)")
        return running.bootstrap_servers, None
    console.print("starting a local Kafka broker from Kafka's jars "
                  "(the first run has Maven fetch them; set KAFKA_BOOTSTRAP_SERVERS to use a cluster) ...")
    broker_mod.fetch_jars()
    if keep:  # a daemon, so `agent-monitor broker stop` stops it later
        info = broker_mod.daemon_start(timeout=180)
        return info.bootstrap_servers, None
    local = broker_mod.LocalBroker(heap="768m").start(timeout=180)
    return local.bootstrap_servers, local


def run_demo(policy: str | None = None, sessions: str | None = None, keep: bool = False,
             engine: str = "incremental", timeout: float = 60.0, bootstrap_servers: str | None = None,
             ready_timeout: float = 240.0) -> int:
    """Run the demo; returns 0 only if every verdict met its sample's expectation (see the module
    docstring)."""
    from monitor.client import MonitorClient, wait_for_broker
    from monitor.topics import create_topics

    console = make_console()  # `make demo | tee`, CI logs: 120 columns
    policy_path = Path(policy) if policy else EXAMPLES / "policies"
    served = _served_ids(policy_path)  # a bad policy stops the demo before any broker starts
    playable = _playable(_load_sessions(Path(sessions) if sessions else EXAMPLES / "sessions"), served,
                         policy_path, console)
    if not playable:
        return 2

    bootstrap, local_broker = _resolve_broker(bootstrap_servers, keep, console)
    worker: WorkerProcess | None = None
    alerts: _AlertReader | None = None
    results: list[PlayedBatch] = []
    prefix = ""
    try:
        wait_for_broker(bootstrap, 30)
        prefix = f"demo-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        created = create_topics(bootstrap, prefix, partitions_override=DEMO_PARTITIONS)
        console.print(f"broker [bold]{bootstrap}[/], topics: {', '.join(r.name for r in created)}")
        registry, public_key = _publish(policy_path, bootstrap, prefix, console)
        worker = _start_worker(policy_path, bootstrap, prefix, engine, served, keep, console, public_key)
        t_start = time.monotonic()
        worker.wait_ready(ready_timeout)
        console.print(f"[green]{worker.ready_line}[/] [dim]after {time.monotonic() - t_start:.1f} s[/]\n")
        alerts = _AlertReader(bootstrap, prefix, console)
        with MonitorClient(bootstrap, prefix) as client:
            results = [r for sample in playable for r in _play(client, sample, timeout, console)]
            results += _live_update(client, registry, playable, timeout, console)
        # alerts trail their verdicts by a moment: wait (bounded) for all the verdicts announced
        want_alerts = sum(len(r.verdict.violations) for r in results if r.verdict)
        alerts.wait_for(want_alerts, 15)
        _summary(console, playable, results, alerts.alerts, want_alerts)
    finally:
        if alerts is not None:
            alerts.close()
        if worker is not None:
            _leave_or_stop(worker, keep, bootstrap, prefix, console)
        if local_broker is not None:
            local_broker.stop()
        elif keep and not (bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")):
            console.print(f"broker left running at {bootstrap} (stop: agent-monitor broker stop)")
    ok = bool(results) and all(r.problem is None for r in results)
    return 0 if ok else 1


def _playable(samples: list[SampleSession], served: set[str], policy_path: Path,
              console: Console) -> list[SampleSession]:
    """The samples whose policy the worker serves; says which are skipped, and when none is left."""
    from rich.markup import escape

    playable = [s for s in samples if s.policy in served]
    for s in samples:
        if s.policy not in served:
            console.print(escape(f"skipping {s.name}: policy {s.policy!r} is not served by {policy_path}"),
                          style="yellow")
    if not playable:
        console.print(escape(f"no sample session uses a policy of {policy_path} "
                             f"(it serves {', '.join(sorted(served))})"), style="red")
    return playable


def _publish(policy_path: Path, bootstrap: str, prefix: str, console: Console) -> tuple[Registry, Path]:
    """Every policy of ``policy_path`` published to the registry (one per file, a folder's files
    combined under the folder's name, as a worker serving the folder would), signed with a key pair
    made for the demo; returns the registry (with the key) and the public key's path."""
    from monitor import signing
    from monitor.policy import policy_files
    from monitor.registry import Registry, prepare_record

    keys = Path(tempfile.mkdtemp(prefix="agent-monitor-demo-keys-"))
    private, public, kid = signing.write_keypair(keys / "demo")
    registry = Registry(bootstrap, prefix, signing_key=signing.load_private_key(private))
    sources = [(f, f.stem) for f in policy_files(policy_path)]
    if policy_path.is_dir():
        sources.append((policy_path, policy_path.name))
    for path, policy_id in sources:
        registry.publish(prepare_record(path, policy_id, author="demo"))
    console.print(f"published {len(sources)} policies to {registry.topic}, signed by key {kid}")
    return registry, public


def _start_worker(policy_path: Path, bootstrap: str, prefix: str, engine: str, served: set[str], keep: bool,
                  console: Console, public_key: Path) -> WorkerProcess:
    """A worker following the demo's policy registry (signed records only), started (not yet ready)."""
    data_dir = Path(tempfile.mkdtemp(prefix="agent-monitor-demo-"))
    settings = WorkerSettings.model_validate({
        "bootstrap_servers": bootstrap, "topic_prefix": prefix, "policy_registry": True,
        "policy_public_keys": [str(public_key)], "default_policy": policy_path.stem,
        "engine": engine, "partitions": DEMO_PARTITIONS, "worker_id": "demo", "log_level": "warning"})
    worker = WorkerProcess(settings, log_path=data_dir / "worker.log").start(new_session=keep)
    console.print(f"worker starting (pid {worker.proc.pid if worker.proc else '?'}, "
                  f"{engine} engine, policies from the registry: {', '.join(sorted(served))}) ...")
    return worker


LIVE_POLICY = "send_after_keyword"
LIVE_SAMPLE = "flow_send_email_split"


def _live_update(client: MonitorClient, registry: Registry, samples: list[SampleSession], timeout: float,
                 console: Console) -> list[PlayedBatch]:
    """A policy update while the worker runs (see the module docstring, step 5); the batches played,
    with what each must get."""
    from monitor.registry import prepare_record

    sample = next((s for s in samples if s.name == LIVE_SAMPLE and s.policy == LIVE_POLICY), None)
    active = registry.read().active(LIVE_POLICY)
    if sample is None or active is None or len(sample.batches) != 2:
        console.print(f"[yellow]no live update: it needs policy {LIVE_POLICY} and the sample {LIVE_SAMPLE}[/]")
        return []
    rule = active.rules[0]
    console.rule(f"[bold]live update[/]  policy [cyan]{LIVE_POLICY}[/] v{active.version} -> v{active.version + 1} "
                 "(its rule tagged \\[action=log]), the worker keeps running", align="left")
    first, second = sample.event_batches(f"{sample.session_id}-live")
    results = [_check(client, sample, first, sample.expect[0], timeout, console)]
    # version 2: the same rule, its message tagged [action=log] (another text: another sha256)
    logged = f"{rule} [action=log]"
    path = Path(tempfile.mkdtemp(prefix="agent-monitor-demo-v2-")) / f"{LIVE_POLICY}.gr"
    path.write_text(active.text.replace(f'"{rule}"', f'"{logged}"', 1))
    t0 = time.monotonic()
    v2 = registry.publish(prepare_record(path, LIVE_POLICY, author="demo", note="the demo's live update"))
    took = _wait_serving(client, v2.version, timeout)
    console.print(f"published v{v2.version} (sha256 {v2.sha256[:12]}, rule 0: {v2.actions.get('0')}); the worker "
                  f"served it [bold]{took:.2f} s[/] after the publish returned ({time.monotonic() - t0:.2f} s "
                  "with the publish itself)")
    # the flow began under v1; v2 rebuilt the session's past from its kept events and catches the end
    results.append(_check(client, sample, second, Expectation(decision="allow", violations=[logged]),
                          timeout, console))
    v3 = registry.rollback(LIVE_POLICY, to=active.version, author="demo")
    took = _wait_serving(client, v3.version, timeout)
    console.print(f"rolled back: v{v3.version} = v{active.version}'s text and actions, served after {took:.2f} s")
    first, second = sample.event_batches(f"{sample.session_id}-rollback")
    results += [_check(client, sample, first, sample.expect[0], timeout, console),
                _check(client, sample, second, sample.expect[1], timeout, console)]
    return results


def _wait_serving(client: MonitorClient, version: int, timeout: float) -> float:
    """Seconds until a probe batch is checked by ``version`` of the live policy."""
    t0 = time.monotonic()
    while True:
        probe = client.check(f"demo-probe-{uuid.uuid4().hex[:8]}", [{"role": "user", "content": "probe"}],
                             policy=LIVE_POLICY, timeout=timeout)
        if probe.policy_version == version:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"version {version} of {LIVE_POLICY} was not served within {timeout:.0f} s")
        time.sleep(0.05)


def _check(client: MonitorClient, sample: SampleSession, batch: Any, want: Expectation, timeout: float,
           console: Console) -> PlayedBatch:
    r = PlayedBatch(sample=f"{sample.name} (live update)", session_id=batch.session_id, batch_id=batch.batch_id,
                    expected=want)
    t0 = time.perf_counter()
    r.verdict = client.check_batch(batch, timeout=timeout)
    r.latency_ms = (time.perf_counter() - t0) * 1000
    r.problem = want.matches_verdict(r.verdict)
    console.print(render_verdict(r.verdict, r.problem, expected=True, latency_ms=r.latency_ms))
    return r


class _AlertReader:
    """The alerts of the demo's topics, printed and kept as they arrive (on a thread of its own)."""

    def __init__(self, bootstrap: str, prefix: str, console: Console) -> None:
        from monitor.client import AlertConsumer

        self.alerts: list[Alert] = []
        self.console = console
        self.reader = AlertConsumer(bootstrap, prefix, from_beginning=True).open()
        self.thread = threading.Thread(target=self._read, name="demo-alerts", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for alert in self.reader:
            self.alerts.append(alert)
            self.console.print(render_alert(alert))

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alerts) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.reader.stop()
        self.thread.join(5)
        self.reader.close()


def _play(client: MonitorClient, sample: SampleSession, timeout: float, console: Console) -> list[PlayedBatch]:
    """Each batch of ``sample`` checked in turn, its verdict printed against its expectation."""
    from rich.markup import escape

    from monitor.client import VerdictTimeout

    console.rule(f"[bold]{escape(sample.name)}[/]  policy [cyan]{escape(sample.policy)}[/]", align="left")
    console.print(f"[dim]{escape(sample.description)}[/]")
    results = []
    for batch, want in zip(sample.event_batches(), sample.expect, strict=True):
        r = PlayedBatch(sample=sample.name, session_id=batch.session_id, batch_id=batch.batch_id, expected=want)
        t0 = time.perf_counter()
        try:
            r.verdict = client.check_batch(batch, timeout=timeout)
            r.latency_ms = (time.perf_counter() - t0) * 1000
            r.problem = want.matches_verdict(r.verdict)
            console.print(render_verdict(r.verdict, r.problem, expected=True, latency_ms=r.latency_ms))
        except VerdictTimeout as exc:
            r.problem = str(exc)
            console.print(f"[bold red]✗ {escape(printable(batch.session_id))} #{escape(printable(batch.batch_id))}: "
                          f"{escape(printable(str(exc)))}[/]")
        results.append(r)
    return results


def _leave_or_stop(worker: WorkerProcess, keep: bool, bootstrap: str, prefix: str, console: Console) -> None:
    """With ``keep``, say how to use and stop the worker; else stop it, showing its log if it failed."""
    from rich.markup import escape

    if worker.proc is None:
        return
    if keep:
        console.print(f"\nworker left running: pid {worker.proc.pid} (stop: kill {worker.proc.pid}; "
                      f"log {worker.log_path}); try:\n  agent-monitor produce "
                      f"examples/sessions/flow_send_email.json --wait --bootstrap-servers {bootstrap} "
                      f"--prefix {prefix}\n  agent-monitor policy history {LIVE_POLICY} --bootstrap-servers "
                      f"{bootstrap} --prefix {prefix}   (publishing needs the demo's key, printed above)")
        return
    code = worker.stop()
    if code not in (0, -signal.SIGTERM, None):
        console.print(f"[yellow]the worker exited with code {code}; its log ends with:[/]\n"
                      f"{escape(worker.log_tail(1500))}")


def _summary(console: Console, samples: list[SampleSession], results: list[PlayedBatch], alerts: list[Alert],
             want_alerts: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    def word(decision: str | None) -> str:
        if decision is None:
            return "[red]?[/]"
        return f"[{DECISION_STYLE[decision]}]{decision[0].upper()}[/]"

    table = Table("session", "policy", "expected", "actual", "", title="summary (A allow, D deny, ? no verdict)",
                  title_justify="left")
    for s in samples:
        rs = [r for r in results if r.sample == s.name]
        ok = len(rs) == len(s.batches) and all(r.problem is None for r in rs)
        table.add_row(escape(printable(s.name)), escape(printable(s.policy)), " ".join(word(e.decision) for e in s.expect),
                      " ".join(word(r.verdict.decision if r.verdict else None) for r in rs),
                      "[green]✓[/]" if ok else "[bold red]✗[/]")
    live = [r for r in results if r.sample.endswith("(live update)")]
    if live:
        versions = " ".join(f"v{r.verdict.policy_version}" if r.verdict else "?" for r in live)
        table.add_row("live update (" + versions + ")", LIVE_POLICY, " ".join(word(r.expected.decision) for r in live),
                      " ".join(word(r.verdict.decision if r.verdict else None) for r in live),
                      "[green]✓[/]" if all(r.problem is None for r in live) else "[bold red]✗[/]")
    console.print()
    console.print(table)
    verdicts = [r.verdict for r in results if r.verdict]
    mismatched = [r for r in results if r.problem]
    lat = [r.latency_ms for r in results if r.latency_ms is not None]
    evals = [v.eval_ms for v in verdicts]
    p50, p95 = _percentile(lat, 0.5), _percentile(lat, 0.95)
    e50, e95 = _percentile(evals, 0.5), _percentile(evals, 0.95)
    console.print(
        f"batches {len(results)}: [green]{sum(v.decision == 'allow' for v in verdicts)} allowed[/], "
        f"[red]{sum(v.decision == 'deny' for v in verdicts)} denied[/], "
        f"{len(results) - len(verdicts)} without a verdict; "
        f"alerts {len(alerts)} (expected {want_alerts}, distinct ids {len({a.alert_id for a in alerts})})"
    )
    if p50 is not None:
        console.print(f"check round trip p50 {p50:.0f} ms, p95 {p95:.0f} ms; "
                      f"policy evaluation p50 {e50:.1f} ms, p95 {e95:.1f} ms")
    if mismatched:
        console.print(f"[bold red]{len(mismatched)} verdict(s) did not match the expectation:[/]")
        for r in mismatched:
            console.print(escape(printable(f"  {r.session_id} #{r.batch_id}: {r.problem}")))
    elif len(alerts) < want_alerts:
        console.print(f"[yellow]only {len(alerts)} of {want_alerts} alerts arrived within 15 s[/]")
    else:
        console.print("[bold green]every verdict matched its expectation[/]")
