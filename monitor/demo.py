"""``agent-monitor demo`` (``make demo``): the whole monitor end to end on one machine.

1. a Kafka broker: ``--bootstrap-servers``, else ``KAFKA_BOOTSTRAP_SERVERS``, else the broker of
   ``agent-monitor broker start`` if it runs, else a local single-node broker started from Kafka's
   jars (fetched once by Maven);
2. topics under a fresh ``demo-...`` prefix;
3. a worker subprocess (``python -m monitor.cli run --policy examples/policies ...``), awaited
   until it prints ``agent-monitor worker ready``;
4. every sample session (``examples/sessions``) played batch by batch with
   :meth:`MonitorClient.check_batch`, verdicts and alerts shown as they arrive;
5. a summary (expected vs actual per session, totals, alerts, latency p50/p95); worker and broker
   stopped. The exit code is 0 only if every verdict met its expectation.

This module also holds the console rendering that ``agent-monitor tail`` and ``produce --wait`` use,
and :func:`read_batches`, the input reader of ``produce``.

Example::

    >>> from monitor.models import Verdict
    >>> render_verdict(Verdict(session_id="s1", batch_id="s1:0", decision="allow")).plain
    's1  #s1:0  ALLOW'
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from monitor.client import MonitorError
from monitor.models import Alert, DeadLetter, EventBatch, Verdict
from monitor.policy import LoadedPolicy
from monitor.samples import (
    Expectation,
    SampleError,
    SampleSession,
    is_sample,
    load_sample,
    load_samples,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
READY_LINE = "agent-monitor worker ready"
DEMO_PARTITIONS = 6

SEVERITY_STYLE = {"low": "blue", "medium": "yellow", "high": "red", "critical": "bold red"}
DECISION_STYLE = {"allow": "bold green", "deny": "bold red"}


class DemoError(MonitorError):
    """The demo could not run (e.g. the worker did not start); the message says why."""


# -- rendering (shared with `tail` and `produce --wait`) ---------------------------------------------

def render_verdict(verdict: Verdict, problem: str | None = None, expected: bool = False,
                   latency_ms: float | None = None) -> Any:
    """One verdict as a line of rich text: session, batch, decision, each violation with severity
    and addresses. With ``expected``, a leading mark says whether it met its expectation."""
    from rich.text import Text

    t = Text()
    if expected:
        t.append("✗ " if problem else "✓ ", style="bold red" if problem else "green")
    t.append(verdict.session_id, style="bold")
    t.append(f"  #{verdict.batch_id}  ")
    t.append(verdict.decision.upper(), style=DECISION_STYLE.get(verdict.decision, ""))
    for v in verdict.violations:
        t.append("\n    ")
        t.append(f"[{v.severity}] ", style=SEVERITY_STYLE.get(v.severity, ""))
        t.append(v.message)
        if v.addresses:
            t.append(f"  @ {', '.join(v.addresses)}", style="dim")
    if verdict.reason and not verdict.violations:
        t.append(f"  ({verdict.reason})", style="italic")
    if latency_ms is not None:
        t.append(f"  {latency_ms:.0f} ms", style="dim")
    if problem:
        t.append(f"\n    {problem}", style="bold red")
    return t


def render_alert(alert: Alert) -> Any:
    from rich.text import Text

    t = Text()
    t.append("ALERT ", style="bold magenta")
    t.append(f"[{alert.severity}] ", style=SEVERITY_STYLE.get(alert.severity, ""))
    t.append(f"{alert.session_id} #{alert.batch_id}  ", style="bold")
    t.append(alert.message)
    if alert.addresses:
        t.append(f"  @ {', '.join(alert.addresses)}", style="dim")
    t.append(f"  id {alert.alert_id[:12]}", style="dim")
    return t


def render_dead_letter(dead: DeadLetter) -> Any:
    from rich.text import Text

    t = Text()
    t.append("DEAD LETTER ", style="bold yellow")
    t.append(f"{dead.kind}  ", style="yellow")
    if dead.session_id:
        t.append(f"{dead.session_id} #{dead.batch_id or '?'}  ", style="bold")
    t.append(dead.reason)
    t.append(f"  from {dead.source.topic}[{dead.source.partition}]@{dead.source.offset}, {dead.size} bytes",
             style="dim")
    return t


def render_record(record: BaseModel) -> Any:
    """Any monitor record as a line of rich text (what ``agent-monitor tail`` prints)."""
    if isinstance(record, Alert):
        return render_alert(record)
    if isinstance(record, Verdict):
        return render_verdict(record)
    if isinstance(record, DeadLetter):
        return render_dead_letter(record)
    return record.model_dump_json()


# -- input of `produce` -----------------------------------------------------------------------------

def _short(exc: ValidationError, limit: int = 3) -> str:
    errs = exc.errors()
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '<record>'}: {e['msg']}" for e in errs[:limit]]
    return "; ".join(parts) + (f" (+{len(errs) - limit} more)" if len(errs) > limit else "")


def _to_batch(data: Any, where: str, session_id: str | None) -> EventBatch:
    if not isinstance(data, dict):
        raise SampleError(f"{where}: expected a JSON object (an EventBatch), got {type(data).__name__}")
    data = dict(data)
    data.setdefault("batch_id", uuid.uuid4().hex)  # a fresh idempotency key for hand-written input
    if session_id:
        data["session_id"] = session_id
    try:
        return EventBatch.model_validate(data)
    except ValidationError as exc:
        raise SampleError(f"{where}: not an EventBatch: {_short(exc)}") from None


def read_batches(text: str, source: str = "<input>", session_id: str | None = None
                 ) -> tuple[list[EventBatch], list[Expectation] | None]:
    """Parse ``produce`` input: one EventBatch object, a JSON list of them, JSON Lines, or a sample
    session (then its expectations come back too). Errors name ``source`` and the line.

    >>> bs, exp = read_batches('{"session_id": "s", "events": [{"role": "user", "content": "hi"}]}')
    >>> bs[0].session_id, len(bs[0].batch_id), exp
    ('s', 32, None)
    >>> [b.seq for b in read_batches('{"session_id": "a", "seq": 0, "events": [{"role": "user"}]}\\n'
    ...                              '{"session_id": "a", "seq": 1, "events": [{"role": "user"}]}')[0]]
    [0, 1]
    """
    stripped = text.strip()
    if not stripped:
        raise SampleError(f"{source}: no input (expected EventBatch JSON, JSON Lines or a sample session)")
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        whole = None
        lines = True
    else:
        lines = False
    if not lines:
        if is_sample(whole):
            try:
                sample = SampleSession.model_validate(whole)
            except ValidationError as exc:
                raise SampleError(f"{source}: not a sample session: {_short(exc)}") from None
            return sample.event_batches(session_id), list(sample.expect)
        if isinstance(whole, list):
            return [_to_batch(item, f"{source}[{i}]", session_id) for i, item in enumerate(whole)], None
        return [_to_batch(whole, source, session_id)], None
    batches = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SampleError(f"{source}:{n}: not JSON: {exc.msg} (column {exc.colno})") from None
        batches.append(_to_batch(data, f"{source}:{n}", session_id))
    return batches, None


# -- the worker subprocess --------------------------------------------------------------------------

class WorkerProcess:
    """``agent-monitor run`` as a child process; :meth:`wait_ready` waits for its ready line.

    Its stdout and stderr go to files, not pipes, so a worker left running (``demo --keep``) never
    dies of a closed pipe once the demo exits.
    """

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.out_path = log_path.with_suffix(".out")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""

    def start(self, new_session: bool = False) -> WorkerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as err, open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "monitor.cli", "run", *self.args], cwd=REPO, env=env,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=new_session,
            )
        return self

    def _ready_line(self) -> str | None:
        try:
            text = self.out_path.read_text(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if READY_LINE in line:
                return line[line.index(READY_LINE):]
        return None

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.out_path, self.log_path):
            try:
                parts.append(path.read_text(errors="replace")[-chars:])
            except OSError:
                pass
        return "\n".join(p.strip() for p in parts if p.strip())

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            line = self._ready_line()
            if line:
                self.ready_line = line
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise DemoError(f"the worker exited with code {self.proc.returncode} before it was ready; "
                                f"its log ends with:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"the worker was not ready after {timeout:.0f}s "
                                f"(no '{READY_LINE}' line); its log ends with:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# -- the demo -------------------------------------------------------------------------------------

class BatchResult(BaseModel):
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


def parse_policies(path: str | Path) -> list[LoadedPolicy]:
    """Each policy file of ``path`` (a file, or a folder's files in name order) parsed once, as
    ``policy check`` and ``run`` validate before anything starts; a file that does not parse raises
    PolicyLoadError naming it and the line. (The worker then loads the full policy set.)

    >>> [p.policy_id for p in parse_policies(EXAMPLES / "policies")][:2]
    ['copyright', 'direct_succession']
    """
    from monitor.policy import PolicyLoadError, load_policy_text, policy_files

    loaded = []
    for f in policy_files(path):
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyLoadError(f"{f}: cannot read the policy: {exc}", str(f)) from None
        loaded.append(load_policy_text(text, policy_id=f.stem, source=str(f)))
    return loaded


def _served_ids(policy_path: Path) -> set[str]:
    """The policy ids a worker serving ``policy_path`` answers to (file stems, and a folder's name
    for all files combined)."""
    ids = {p.policy_id for p in parse_policies(policy_path)}
    if policy_path.is_dir():
        ids.add(policy_path.name)
    return ids


def _resolve_broker(bootstrap: str | None, keep: bool, console: Any) -> tuple[str, Any]:
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
    """Run the demo; returns 0 only if every verdict met its sample's expectation.

    Example (starts a broker and a worker; about a minute)::

        from monitor.demo import run_demo
        raise SystemExit(run_demo())
    """
    from rich.console import Console
    from rich.markup import escape

    from monitor.client import (
        AlertConsumer,
        MonitorClient,
        VerdictTimeout,
        wait_for_broker,
    )
    from monitor.topics import create_topics

    console = Console(highlight=False)
    if not console.is_terminal:  # `make demo | tee`, CI logs: rich would assume 80 columns
        console.width = 120
    policy_path = Path(policy) if policy else EXAMPLES / "policies"
    sessions_path = Path(sessions) if sessions else EXAMPLES / "sessions"
    served = _served_ids(policy_path)  # a bad policy stops the demo before any broker starts
    samples = _load_sessions(sessions_path)
    playable = [s for s in samples if s.policy in served]
    for s in samples:
        if s.policy not in served:
            console.print(escape(f"skipping {s.name}: policy {s.policy!r} is not served by {policy_path}"),
                          style="yellow")
    if not playable:
        console.print(escape(f"no sample session uses a policy of {policy_path} "
                             f"(it serves {', '.join(sorted(served))})"), style="red")
        return 2

    bootstrap, local_broker = _resolve_broker(bootstrap_servers, keep, console)
    worker: WorkerProcess | None = None
    alerts: list[Alert] = []
    alert_reader: AlertConsumer | None = None
    alert_thread: threading.Thread | None = None
    results: list[BatchResult] = []
    prefix = ""
    try:
        wait_for_broker(bootstrap, 30)
        prefix = f"demo-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        created = create_topics(bootstrap, prefix, partitions_override=DEMO_PARTITIONS)
        console.print(f"broker [bold]{bootstrap}[/], topics: {', '.join(r.name for r in created)}")

        data_dir = Path(tempfile.mkdtemp(prefix="agent-monitor-demo-"))
        worker = WorkerProcess(
            ["--policy", str(policy_path), "--bootstrap-servers", bootstrap, "--prefix", prefix,
             "--engine", engine, "--partitions", str(DEMO_PARTITIONS),
             "--worker-id", "demo", "--log-level", "warning"],
            log_path=data_dir / "worker.log",
        ).start(new_session=keep)
        console.print(f"worker starting (pid {worker.proc.pid if worker.proc else '?'}, "
                      f"{engine} engine, policies: {', '.join(sorted(served))}) ...")
        t_start = time.monotonic()
        worker.wait_ready(ready_timeout)
        console.print(f"[green]{worker.ready_line}[/] [dim]after {time.monotonic() - t_start:.1f} s[/]\n")

        alert_reader = AlertConsumer(bootstrap, prefix, from_beginning=True).open()

        def read_alerts() -> None:
            assert alert_reader is not None
            for alert in alert_reader:
                alerts.append(alert)
                console.print(render_alert(alert))

        alert_thread = threading.Thread(target=read_alerts, name="demo-alerts", daemon=True)
        alert_thread.start()

        with MonitorClient(bootstrap, prefix) as client:
            for sample in playable:
                console.rule(f"[bold]{escape(sample.name)}[/]  policy [cyan]{escape(sample.policy)}[/]",
                             align="left")
                console.print(f"[dim]{escape(sample.description)}[/]")
                for batch, want in zip(sample.event_batches(), sample.expect):
                    r = BatchResult(sample=sample.name, session_id=batch.session_id, batch_id=batch.batch_id,
                                    expected=want)
                    t0 = time.perf_counter()
                    try:
                        r.verdict = client.check_batch(batch, timeout=timeout)
                        r.latency_ms = (time.perf_counter() - t0) * 1000
                        r.problem = want.matches_verdict(r.verdict)
                        console.print(render_verdict(r.verdict, r.problem, expected=True, latency_ms=r.latency_ms))
                    except VerdictTimeout as exc:
                        r.problem = str(exc)
                        console.print(f"[bold red]✗ {escape(batch.session_id)} #{escape(batch.batch_id)}: "
                                      f"{escape(str(exc))}[/]")
                    results.append(r)
        # alerts trail their verdicts by a moment: wait (bounded) for all the verdicts announced
        want_alerts = sum(len(r.verdict.violations) for r in results if r.verdict)
        deadline = time.monotonic() + 15
        while len(alerts) < want_alerts and time.monotonic() < deadline:
            time.sleep(0.1)
        _summary(console, playable, results, alerts, want_alerts)
    finally:
        if alert_reader is not None:
            alert_reader.stop()
            if alert_thread is not None:
                alert_thread.join(5)
            alert_reader.close()
        if worker is not None and worker.proc is not None:
            if keep:
                console.print(f"\nworker left running: pid {worker.proc.pid} (stop: kill {worker.proc.pid}; "
                              f"log {worker.log_path}); try:\n  agent-monitor produce "
                              f"examples/sessions/flow_send_email.json --wait --bootstrap-servers {bootstrap} "
                              f"--prefix {prefix}")
            else:
                code = worker.stop()
                if code not in (0, -signal.SIGTERM, None):
                    console.print(f"[yellow]the worker exited with code {code}; its log ends with:[/]\n"
                                  f"{escape(worker.log_tail(1500))}")
        if local_broker is not None:
            local_broker.stop()
        elif keep and not (bootstrap_servers or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")):
            console.print(f"broker left running at {bootstrap} (stop: agent-monitor broker stop)")
    ok = bool(results) and all(r.problem is None for r in results)
    return 0 if ok else 1


def _summary(console: Any, samples: list[SampleSession], results: list[BatchResult], alerts: list[Alert],
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
        table.add_row(escape(s.name), escape(s.policy), " ".join(word(e.decision) for e in s.expect),
                      " ".join(word(r.verdict.decision if r.verdict else None) for r in rs),
                      "[green]✓[/]" if ok else "[bold red]✗[/]")
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
            console.print(escape(f"  {r.session_id} #{r.batch_id}: {r.problem}"))
    elif len(alerts) < want_alerts:
        console.print(f"[yellow]only {len(alerts)} of {want_alerts} alerts arrived within 15 s[/]")
    else:
        console.print("[bold green]every verdict matched its expectation[/]")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m monitor.demo`` is ``agent-monitor demo``."""
    from monitor.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
