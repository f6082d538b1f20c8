"""``agent-monitor``: the command line. Each subcommand parses flags and delegates to the module that
does the work (worker, topics, client, broker, engine, demo, replay).

Exit codes: 0 success, 1 the command ran but failed (e.g. a verdict differed from the expectation),
2 bad usage, unreadable input or a policy that does not parse, 3 no Kafka broker answered,
130 interrupted.

Example::

    >>> main(["policy", "check", "examples/policies/copyright.gr"])  # doctest: +SKIP
    examples/policies/copyright.gr: ok (1 rule, policy id copyright, sha256 1f2e...)
    0
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monitor.config import DEFAULT_BOOTSTRAP, DEFAULT_PREFIX

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Modules that add their own subcommands: each may define ``register_cli(subparsers)`` (or
# ``register``/``add_cli``) adding parsers whose ``func(args) -> int`` handles the command. A module
# that is missing or fails to import is left out, so a broken extension never breaks the CLI.
EXTENSIONS: list[str] = ["monitor.replay", "monitor.api.cli"]
_HOOKS = ("register_cli", "register", "add_cli")


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# -- argument types: the message says what is expected ----------------------------------------------

def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {value}")
    return value


def _bootstrap(text: str) -> str:
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected HOST:PORT[,HOST:PORT...], got {text!r}")
    return text


def default_bootstrap() -> str:
    """``KAFKA_BOOTSTRAP_SERVERS``, else the broker ``agent-monitor broker start`` runs, else
    127.0.0.1:9092."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        return env
    try:
        from monitor.broker import daemon_status

        info = daemon_status()
    except Exception:  # noqa: BLE001 - no recorded broker is the common case
        info = None
    return info.bootstrap_servers if info else DEFAULT_BOOTSTRAP


def _kafka_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", "-b", type=_bootstrap, metavar="HOST:PORT",
                   help="Kafka cluster (default: $KAFKA_BOOTSTRAP_SERVERS, else the broker of "
                        "`agent-monitor broker start`, else 127.0.0.1:9092)")
    p.add_argument("--prefix", metavar="PREFIX",
                   help=f"topic name prefix (default: $AGENT_MONITOR_PREFIX, else {DEFAULT_PREFIX!r})")
    p.add_argument("--connect-timeout", type=_positive_float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to answer (default 10)")


def _bootstrap_of(args: argparse.Namespace) -> str:
    return args.bootstrap_servers or default_bootstrap()


def _prefix_of(args: argparse.Namespace) -> str:
    return args.prefix or os.environ.get("AGENT_MONITOR_PREFIX") or DEFAULT_PREFIX


def _console(stderr: bool = False, width: int = 120) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # piped: rich would assume 80 columns
        console.width = width
    return console


# -- run ----------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from monitor.client import wait_for_broker
    from monitor.config import WorkerSettings

    # refuse a bad policy before touching Kafka (the worker loads the full policy set itself)
    policies = _policies_of(args.policy)
    bootstrap = _bootstrap_of(args)
    wait_for_broker(bootstrap, args.connect_timeout)
    fields: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "topic_prefix": _prefix_of(args), "policy_path": args.policy,
        "group_id": args.group_id, "engine": args.engine, "partitions": args.partitions,
        "budget_ms": args.budget_ms, "fail_closed": not args.fail_open, "keep_denied": args.keep_denied,
        "metrics_port": args.metrics_port, "guarantee": args.guarantee,
        "commit_interval_ms": args.commit_interval_ms, "worker_id": args.worker_id, "log_level": args.log_level,
        "max_record_bytes": args.max_record_bytes, "create_topics": not args.no_create_topics,
        "max_verdict_violations": args.max_verdict_violations, "verdict_memory": args.verdict_memory,
        "reference_max_history": args.history,
    }
    if args.session_ttl is not None:
        fields["session_ttl_s"] = None if args.session_ttl == 0 else args.session_ttl
    settings = WorkerSettings(**{k: v for k, v in fields.items() if v is not None})
    print(f"agent-monitor: serving {', '.join(p.policy_id for p in policies)} on "
          f"{settings.topics.events} at {bootstrap} ({settings.engine} engine)", file=sys.stderr)
    from monitor.topics import TopicProvisioningError
    from monitor.worker import run_worker

    try:
        run_worker(settings)
    except TopicProvisioningError as exc:  # existing topics contradict the spec: a person decides
        raise CliError(str(exc), EXIT_FAILED) from None
    return EXIT_OK


# -- topics -------------------------------------------------------------------------------------

def cmd_topics_create(args: argparse.Namespace) -> int:
    from monitor.client import wait_for_broker
    from monitor.topics import (
        TopicProvisioningError,
        create_topics,
        parse_partition_overrides,
    )

    try:
        overrides: dict[str, int] = parse_partition_overrides(args.partition or [])
    except ValueError as exc:
        raise CliError(f"--partition: {exc}") from None
    if args.partitions is not None:
        overrides.setdefault("events", args.partitions)
    bootstrap = _bootstrap_of(args)
    wait_for_broker(bootstrap, args.connect_timeout)
    try:
        results = create_topics(bootstrap, _prefix_of(args), overrides or None,
                                replication_factor=args.replication_factor,
                                increase_partitions=args.increase_partitions)
    except (TopicProvisioningError, ValueError) as exc:
        raise CliError(str(exc), EXIT_FAILED) from None
    from rich.table import Table
    from rich.text import Text

    table = Table("topic", "status", "partitions", "differs from the spec", title=f"topics at {bootstrap}")
    colour = {"created": "green", "exists": "cyan", "increased": "yellow"}
    for r in results:
        drift = ", ".join(f"{k}={have} (spec {want})" for k, (have, want) in r.config_drift.items())
        table.add_row(r.name, Text(r.status, style=colour.get(r.status, "")), str(r.partitions), Text(drift))
    _console().print(table)
    return EXIT_OK


def cmd_topics_schemas(args: argparse.Namespace) -> int:
    from monitor.topics import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return EXIT_OK


# -- produce ------------------------------------------------------------------------------------

def cmd_produce(args: argparse.Namespace) -> int:
    from monitor.client import MonitorClient
    from monitor.demo import read_batches, render_verdict

    source = "-" if args.file in (None, "-") else args.file
    text = sys.stdin.read() if source == "-" else _read_text(source)
    batches, expectations = read_batches(text, source="<stdin>" if source == "-" else source,
                                         session_id=args.session_id)
    if args.policy_id:
        batches = [b.model_copy(update={"policy": args.policy_id}) for b in batches]
    console = _console()
    failed = 0
    with MonitorClient(_bootstrap_of(args), _prefix_of(args), connect_timeout=args.connect_timeout) as client:
        for i, batch in enumerate(batches):
            if not args.wait:
                client.publish(batch)
                if args.json:
                    print(json.dumps({"session_id": batch.session_id, "batch_id": batch.batch_id,
                                      "partition": client.last_partition, "offset": client.last_offset}))
                continue
            verdict = client.check_batch(batch, timeout=args.timeout)
            problem = expectations[i].matches_verdict(verdict) if expectations else None
            failed += problem is not None
            if args.json:
                print(verdict.model_dump_json())
            else:
                console.print(render_verdict(verdict, problem=problem, expected=bool(expectations)))
    if not args.json:
        where = f"{client.topics.events} at {client.bootstrap_servers}"
        print(f"published {len(batches)} batch(es) to {where}", file=sys.stderr)
    if failed:
        print(f"{failed} verdict(s) differ from the sample's expectations", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read: {exc}") from None


# -- tail ---------------------------------------------------------------------------------------

def cmd_tail(args: argparse.Namespace) -> int:
    from monitor.client import CONSUMERS
    from monitor.demo import render_record

    consumer_cls = CONSUMERS[args.topic]
    console = _console()
    with consumer_cls(_bootstrap_of(args), _prefix_of(args), from_beginning=args.from_beginning,
                      timeout=args.timeout, idle_timeout=args.idle, max_records=args.max,
                      session_id=args.session, connect_timeout=args.connect_timeout) as records:
        if not args.json:
            start = "the beginning" if args.from_beginning else "now"
            print(f"tailing {records.topic} from {start} (Ctrl-C stops)", file=sys.stderr)
        for record in records:
            if args.json:
                print(record.model_dump_json(), flush=True)
            else:
                console.print(render_record(record))
        if records.skipped:
            print(f"skipped {records.skipped} record(s) that are not {consumer_cls.model.__name__}s",
                  file=sys.stderr)
    return EXIT_OK


# -- broker -------------------------------------------------------------------------------------

def cmd_broker(args: argparse.Namespace) -> int:
    from monitor import broker

    if args.action == "fetch":
        print(broker.fetch_jars(quiet=not args.verbose))
        return EXIT_OK
    if args.action == "start":
        running = broker.daemon_status()
        info = running or broker.daemon_start(port=args.port, timeout=args.timeout)
        state = "already running" if running else "started"
        print(f"Kafka {info.version} broker {state}: {info.bootstrap_servers} (pid {info.pid}, log {info.log_file})")
        print(f"export KAFKA_BOOTSTRAP_SERVERS={info.bootstrap_servers}")
        return EXIT_OK
    if args.action == "stop":
        stopped = broker.daemon_stop()
        print("broker stopped" if stopped else "no broker was running")
        return EXIT_OK
    info = broker.daemon_status()
    if info is None:
        print("no broker running (start one: agent-monitor broker start)")
        return EXIT_FAILED
    print(f"running: {info.bootstrap_servers} (pid {info.pid}, Kafka {info.version}, data {info.data_dir})")
    return EXIT_OK


# -- policy -------------------------------------------------------------------------------------

def _policies_of(path: str) -> list[Any]:
    from monitor.demo import parse_policies

    return parse_policies(path)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from monitor.engine.reference import _rules

    for policy in _policies_of(args.path):
        n = len(_rules(policy))
        print(f"{', '.join(policy.sources) or args.path}: ok ({n} rule{'s' if n != 1 else ''}, "
              f"policy id {policy.policy_id}, sha256 {policy.sha256[:12]})")
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from monitor.engine import make_engine

    console = _console()
    for policy in _policies_of(args.path):
        engine = make_engine(policy, args.engine)
        try:
            rules = engine.explain()
        finally:
            engine.close()
        if args.json:
            print(json.dumps({"policy_id": policy.policy_id, "sources": policy.sources,
                              "rules": [r.model_dump() for r in rules]}))
            continue
        table = Table("#", "rule", "engine", "why", show_lines=True,
                      title=Text(f"{policy.policy_id} ({', '.join(policy.sources)})"))
        for r in rules:
            table.add_row(str(r.index), Text(r.message), r.engine, Text(r.reason))
        console.print(table)
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from monitor.demo import run_demo

    return run_demo(policy=args.policy, sessions=args.sessions, keep=args.keep, engine=args.engine,
                    timeout=args.timeout, bootstrap_servers=args.bootstrap_servers)


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The whole command line (extensions included)."""
    parser = argparse.ArgumentParser(
        prog="agent-monitor",
        description="A Kafka-native guardrail monitor for AI agents: Invariant policies on agent event streams.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad usage/input/policy, 3 no Kafka broker answered.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a monitor worker (blocks; stops on SIGTERM/Ctrl-C)",
                       description="Run a monitor worker: consume <prefix>.events, publish verdicts and alerts.")
    p.add_argument("--policy", required=True, metavar="FILE|DIR",
                   help="policy file, or a folder (one policy per file, selected by a batch's policy id)")
    _kafka_args(p)
    p.add_argument("--group-id", help="consumer group (default <prefix>-monitor)")
    p.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    p.add_argument("--partitions", type=_int_at_least(1), metavar="N",
                   help="partitions of the events topic when the worker creates it (default 12)")
    p.add_argument("--budget-ms", type=_positive_float, metavar="MS", help="time budget of one batch (default 5000)")
    p.add_argument("--fail-open", action="store_true",
                   help="allow (instead of deny) a batch whose policy errors or overruns its budget")
    p.add_argument("--keep-denied", action="store_true", help="denied batches join the session's past")
    p.add_argument("--max-record-bytes", type=_int_at_least(1024), metavar="BYTES",
                   help="larger records are dead-lettered (default 1000000)")
    p.add_argument("--max-verdict-violations", type=_int_at_least(1), metavar="N",
                   help="violations listed in one verdict; the rest are counted, their alerts still go out "
                        "(default 200)")
    p.add_argument("--verdict-memory", type=_int_at_least(1), metavar="N",
                   help="recent batches per session whose verdict a redelivery repeats (default 64)")
    p.add_argument("--history", type=_int_at_least(1), metavar="EVENTS",
                   help="events of the past the reference engine (and rules the incremental engine cannot "
                        "compile) see (default 2000)")
    p.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus /metrics on this port")
    p.add_argument("--guarantee", choices=["at-least-once", "exactly-once"],
                   help="at-least-once (default): a verdict goes out as soon as it is decided, a crash "
                        "may repeat one; exactly-once: verdicts, alerts, state and offsets commit in one "
                        "Kafka transaction (readers use read_committed)")
    p.add_argument("--commit-interval-ms", type=_positive_float, metavar="MS",
                   help="how often offsets are committed (default 200) or transactions closed under "
                        "exactly-once (default 50: what a verdict reader waits at most)")
    p.add_argument("--session-ttl", type=_non_negative_float, metavar="S",
                   help="forget a session idle this many seconds (its state is tombstoned); 0 = never "
                        "(default 86400)")
    p.add_argument("--worker-id", help="name of this worker in logs and metrics")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], default="warning")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.set_defaults(func=cmd_run)

    t = sub.add_parser("topics", help="provision topics, regenerate JSON Schemas")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create the deployment's topics (idempotent) and print a table")
    _kafka_args(tc)
    tc.add_argument("--partitions", type=_int_at_least(1), metavar="N", help="partitions of the events topic")
    tc.add_argument("--partition", action="append", metavar="TOPIC=N",
                    help="partitions of one topic, e.g. alerts=3 (repeatable)")
    tc.add_argument("--replication-factor", type=int, metavar="N", help="-1 = the broker's default")
    tc.add_argument("--increase-partitions", action="store_true",
                    help="allow adding partitions to existing topics (moves sessions!)")
    tc.set_defaults(func=cmd_topics_create)
    ts = tsub.add_parser("schemas", help="regenerate topics/schemas/*.schema.json from the models")
    ts.add_argument("--out", metavar="DIR", help="folder (default topics/schemas)")
    ts.set_defaults(func=cmd_topics_schemas)

    pr = sub.add_parser("produce", help="publish EventBatch records (JSON, JSONL or a sample session)",
                        description="Publish EventBatch records from a file or stdin: one JSON object, a JSON "
                                    "list, JSON Lines, or a sample session file (examples/sessions/*.json). "
                                    "A record without batch_id gets a fresh one.")
    pr.add_argument("file", nargs="?", help="input file ('-' or none: stdin)")
    _kafka_args(pr)
    pr.add_argument("--wait", action="store_true", help="wait for each batch's verdict and print it")
    pr.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                    help="seconds to wait for a verdict with --wait (default 30)")
    pr.add_argument("--session-id", help="override the session id of every record")
    pr.add_argument("--policy-id", help="set the policy id of every record")
    pr.add_argument("--json", action="store_true", help="print JSON lines")
    pr.set_defaults(func=cmd_produce)

    tl = sub.add_parser("tail", help="print verdicts, alerts or dead letters as they arrive")
    tl.add_argument("topic", choices=["verdicts", "alerts", "deadletter"])
    _kafka_args(tl)
    tl.add_argument("--from-beginning", action="store_true", help="start at the earliest record")
    tl.add_argument("--max", type=_int_at_least(1), metavar="N", help="stop after N records")
    tl.add_argument("--timeout", type=_positive_float, metavar="S", help="stop after S seconds")
    tl.add_argument("--idle", type=_positive_float, metavar="S", help="stop after S seconds without a record")
    tl.add_argument("--session", help="only this session's records")
    tl.add_argument("--json", action="store_true", help="one JSON record per line")
    tl.set_defaults(func=cmd_tail)

    b = sub.add_parser("broker", help="a local single-node Kafka broker from Kafka's jars")
    b.add_argument("action", choices=["start", "stop", "status", "fetch"],
                   help="start/stop/status of the background broker; fetch = download the jars only")
    b.add_argument("--port", type=_port, help="listener port for start (default: a free one)")
    b.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S",
                   help="seconds to wait for the broker to start (default 120)")
    b.add_argument("--verbose", action="store_true", help="show Maven's output on fetch")
    b.set_defaults(func=cmd_broker)

    po = sub.add_parser("policy", help="check a policy or explain how its rules are evaluated")
    posub = po.add_subparsers(dest="action", required=True, metavar="ACTION")
    pc = posub.add_parser("check", help="parse a policy file or folder and report")
    pc.add_argument("path", metavar="FILE|DIR")
    pc.set_defaults(func=cmd_policy_check)
    pe = posub.add_parser("explain", help="per rule: which engine evaluates it and why")
    pe.add_argument("path", metavar="FILE|DIR")
    pe.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    pe.add_argument("--json", action="store_true")
    pe.set_defaults(func=cmd_policy_explain)

    d = sub.add_parser("demo", help="play the sample sessions through a worker and show the verdicts",
                       description="Start a local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), create "
                                   "topics under a fresh prefix, start a worker, play the sample sessions "
                                   "and compare every verdict with its expectation (exit 0 iff all match).")
    d.add_argument("--policy", metavar="FILE|DIR", help="policy (default examples/policies)")
    d.add_argument("--sessions", metavar="DIR|FILE", help="sample sessions (default examples/sessions)")
    d.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    d.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S", help="per-verdict timeout")
    d.add_argument("--bootstrap-servers", type=_bootstrap, metavar="HOST:PORT",
                   help="use this cluster (default $KAFKA_BOOTSTRAP_SERVERS, else a broker the demo starts)")
    d.add_argument("--keep", action="store_true",
                   help="leave the broker and worker running afterwards (prints how to stop them)")
    d.set_defaults(func=cmd_demo)

    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for hook in _HOOKS:
            if callable(getattr(module, hook, None)):
                getattr(module, hook)(sub)
                break
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv_ = argv  # replay records its own command line in its manifest
    from monitor.broker import BrokerError
    from monitor.client import BrokerUnreachable, MonitorError, TopicMissing
    from monitor.policy import PolicyLoadError
    from monitor.samples import SampleError

    try:
        return int(args.func(args) or 0)
    except PolicyLoadError as exc:
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnreachable as exc:
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (SampleError, CliError) as exc:
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return getattr(exc, "code", EXIT_USAGE)
    except TopicMissing as exc:
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (MonitorError, BrokerError) as exc:
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("agent-monitor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `agent-monitor tail ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
