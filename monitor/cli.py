"""``agent-monitor``: the command line. Each subcommand parses flags and delegates to the module that
does the work (worker, topics, client, broker, engine, demo, replay).

Exit codes: 0 success, 1 the command ran but failed (e.g. a verdict differed from the expectation),
2 bad usage, unreadable input or a policy that does not parse, 3 no Kafka broker answered,
130 interrupted.

Example::

    >>> main(["policy", "check", "examples/policies/copyright.gr"])  # doctest: +ELLIPSIS
    examples/policies/copyright.gr: ok (1 rule, policy id copyright, sha256 ...)
    0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor import sandbox, signing
from monitor.api.cli import register_cli as register_serve
from monitor.argtypes import host_ports, int_at_least, kinds_of, metrics_url, non_negative_float, port, positive_float
from monitor.cli_options import CliError, allow_import_arg, bootstrap_of, kafka_args, prefix_of
from monitor.config import FAIL_OPEN_KINDS, WorkerSettings
from monitor.console import make_console, printable_json, render_record, render_verdict
from monitor.core import short_validation
from monitor.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, MonitorError
from monitor.policy import parse_policies
from monitor.registry_cli import register_cli as register_registry
from monitor.replay.cli import register_cli as register_replay
from monitor.samples import read_batches

# -- run ----------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from monitor.client import wait_for_broker

    # refuse a bad policy before touching Kafka (the worker loads the full policy set itself)
    sandbox.set_allowed_imports(args.allow_import or [])
    if args.policy_public_key and not args.policy_registry:
        raise CliError("--policy-public-key checks policy registry records: use it with --policy-registry")
    if args.default_policy and not args.policy_registry:
        raise CliError("--default-policy names a registry policy: use it with --policy-registry")
    policies = parse_policies(args.policy) if args.policy else []
    for key in args.policy_public_key or []:
        signing.load_public_key(key)  # a bad key file stops here, before Kafka
    bootstrap = bootstrap_of(args)
    fields: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "topic_prefix": prefix_of(args), "policy_path": args.policy,
        "policy_registry": args.policy_registry, "policy_public_keys": args.policy_public_key or [],
        "default_policy": args.default_policy,
        "group_id": args.group_id, "engine": args.engine, "partitions": args.partitions,
        "budget_ms": args.budget_ms, "fail_closed": args.fail_open is None, "fail_open_kinds": args.fail_open,
        "keep_denied": args.keep_denied,
        "metrics_port": args.metrics_port, "guarantee": args.guarantee,
        "commit_interval_ms": args.commit_interval_ms, "worker_id": args.worker_id, "log_level": args.log_level,
        "max_record_bytes": args.max_record_bytes, "create_topics": not args.no_create_topics,
        "max_verdict_violations": args.max_verdict_violations, "verdict_memory": args.verdict_memory,
        "reference_max_history": args.history, "allow_imports": args.allow_import or [],
        **{name: getattr(args, name) for name in LIMIT_FLAGS},
    }
    if args.session_ttl is not None:
        fields["session_ttl_s"] = None if args.session_ttl == 0 else args.session_ttl
    try:
        settings = WorkerSettings(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:  # a limit out of its range (--max-output-bytes 2000000)
        raise CliError(f"run: {short_validation(exc)}") from None
    wait_for_broker(bootstrap, args.connect_timeout)
    served = ", ".join(p.policy_id for p in policies) or f"the policies of {settings.topics.policies}"
    print(f"agent-monitor: serving {served} on {settings.topics.events} at {bootstrap} "
          f"({settings.engine} engine)", file=sys.stderr)
    from monitor.worker import run_worker

    # existing topics that contradict the spec end it (TopicProvisioningError: a person decides)
    run_worker(settings)
    return EXIT_OK


# -- topics -------------------------------------------------------------------------------------

def cmd_topics_create(args: argparse.Namespace) -> int:
    from monitor.client import wait_for_broker
    from monitor.topics import create_topics, parse_partition_overrides

    try:
        overrides: dict[str, int] = parse_partition_overrides(args.partition or [])
    except ValueError as exc:
        raise CliError(f"--partition: {exc}") from None
    if args.partitions is not None:
        overrides.setdefault("events", args.partitions)
    bootstrap = bootstrap_of(args)
    wait_for_broker(bootstrap, args.connect_timeout)
    try:
        results = create_topics(bootstrap, prefix_of(args), overrides or None,
                                replication_factor=args.replication_factor,
                                increase_partitions=args.increase_partitions)
    except ValueError as exc:  # a bad spec (TopicProvisioningError exits 1 by itself)
        raise CliError(str(exc), EXIT_FAILED) from None
    from rich.table import Table
    from rich.text import Text

    table = Table("topic", "status", "partitions", "differs from the spec", title=f"topics at {bootstrap}")
    colour = {"created": "green", "exists": "cyan", "increased": "yellow"}
    for r in results:
        drift = ", ".join(f"{k}={have} (spec {want})" for k, (have, want) in r.config_drift.items())
        table.add_row(r.name, Text(r.status, style=colour.get(r.status, "")), str(r.partitions), Text(drift))
    make_console().print(table)
    return EXIT_OK


def cmd_topics_schemas(args: argparse.Namespace) -> int:
    from monitor.topics import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return EXIT_OK


# -- produce ------------------------------------------------------------------------------------

def cmd_produce(args: argparse.Namespace) -> int:
    from monitor.client import MonitorClient

    source = "-" if args.file in (None, "-") else args.file
    text = sys.stdin.read() if source == "-" else _read_text(source)
    batches, expectations = read_batches(text, source="<stdin>" if source == "-" else source,
                                         session_id=args.session_id)
    if args.policy_id:
        batches = [b.model_copy(update={"policy": args.policy_id}) for b in batches]
    console = make_console()
    failed = 0
    with MonitorClient(bootstrap_of(args), prefix_of(args), connect_timeout=args.connect_timeout) as client:
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
                print(printable_json(verdict.model_dump_json()))
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

    consumer_cls = CONSUMERS[args.topic]
    console = make_console()
    with consumer_cls(bootstrap_of(args), prefix_of(args), from_beginning=args.from_beginning,
                      timeout=args.timeout, idle_timeout=args.idle, max_records=args.max,
                      session_id=args.session, connect_timeout=args.connect_timeout) as records:
        if not args.json:
            start = "the beginning" if args.from_beginning else "now"
            print(f"tailing {records.topic} from {start} (Ctrl-C stops)", file=sys.stderr)
        for record in records:
            if args.json:
                print(printable_json(record.model_dump_json()), flush=True)
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
    status = broker.daemon_status()
    if status is None:
        print("no broker running (start one: agent-monitor broker start)")
        return EXIT_FAILED
    print(f"running: {status.bootstrap_servers} (pid {status.pid}, Kafka {status.version}, data {status.data_dir})")
    return EXIT_OK


# -- policy -------------------------------------------------------------------------------------

def cmd_policy_check(args: argparse.Namespace) -> int:
    sandbox.set_allowed_imports(args.allow_import or [])
    for policy in parse_policies(args.path):
        n = len(policy.rules)
        print(f"{', '.join(policy.sources) or args.path}: ok ({n} rule{'s' if n != 1 else ''}, "
              f"policy id {policy.policy_id}, sha256 {policy.sha256[:12]})")
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from monitor.engine import make_engine

    sandbox.set_allowed_imports(args.allow_import or [])
    console = make_console()
    for policy in parse_policies(args.path):
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


# -- top ----------------------------------------------------------------------------------------

def cmd_top(args: argparse.Namespace) -> int:
    from monitor.top import DEFAULT_URL, read_token, run_top

    try:
        token = read_token(args.token, args.token_file)
    except OSError as exc:
        raise CliError(f"cannot read the token file: {exc}") from None
    return run_top(args.url or [DEFAULT_URL], token, make_console(), interval=args.interval, once=args.once,
                   rules=args.rules, timeout=args.timeout, max_partitions=args.partitions)


# -- the parser ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="agent-monitor",
        description="A Kafka-native guardrail monitor for AI agents: Invariant policies on agent event streams.",
        epilog="Exit codes: 0 ok, 1 failed, 2 bad usage/input/policy, 3 no Kafka broker answered.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run(sub)
    _add_topics(sub)
    _add_produce(sub)
    _add_tail(sub)
    _add_broker(sub)
    _add_policy(sub)
    _add_demo(sub)
    _add_top(sub)
    register_replay(sub)  # replay and verify
    register_serve(sub)  # the HTTP API
    return parser


# agent-monitor run's limit flags: WorkerSettings field -> (metavar, lowest value, help)
LIMIT_FLAGS: dict[str, tuple[str, int, str]] = {
    "max_batch_events": ("N", 1, "events in one batch; a larger batch is refused (deny + dead letter)"),
    "max_id_bytes": ("BYTES", 16, "UTF-8 bytes of a session, batch or policy id and of a record key; "
                                  "longer ones are refused, never echoed"),
    "max_rule_matches": ("N", 1, "violations of one rule in one batch; past it matching stops and one "
                                 "summary violation says there are more"),
    "max_batch_matches": ("N", 1, "violations of all rules in one batch; past it matching stops"),
    "max_batch_alerts": ("N", 1, "alerts published for one batch; the rest are summed up in one alert"),
    "max_session_entries": ("N", 1, "state entries a session keeps per policy; a batch that would go past "
                                    "it is denied and does not join the past"),
    "max_output_bytes": ("BYTES", 4096, "bytes of a verdict or alert record; a larger one is cut down "
                                        "to a valid smaller one that says why"),
    "max_state_record_bytes": ("BYTES", 4096, "bytes of a state or dead-letter record; a batch whose "
                                              "state needs a larger one is denied"),
    "engine_processes": ("N", 0, "processes running invariant-ai (reference engine, uncompiled rules), "
                                 "killed at a check's budget; 0 = threads that cannot be stopped"),
}


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run a monitor worker (blocks; stops on SIGTERM/Ctrl-C)",
                       description="Run a monitor worker: consume <prefix>.events, publish verdicts and alerts.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", metavar="FILE|DIR",
                        help="policy file, or a folder (one policy per file, selected by a batch's policy id)")
    source.add_argument("--policy-registry", action="store_true",
                        help="serve the policies of <prefix>.policies: read from the beginning, then "
                             "followed (a new version serves from the next batch, no restart)")
    p.add_argument("--policy-public-key", action="append", metavar="FILE",
                   help="with --policy-registry: take only records signed by this Ed25519 key (PEM; "
                        "repeatable, for key rotation); others are refused, logged and counted")
    p.add_argument("--default-policy", metavar="ID",
                   help="with --policy-registry: the policy of batches that name none (default: none, "
                        "such batches are denied)")
    kafka_args(p)
    p.add_argument("--group-id", help="consumer group (default <prefix>-monitor)")
    p.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    p.add_argument("--partitions", type=int_at_least(1), metavar="N",
                   help="partitions of the events topic when the worker creates it (default 12)")
    p.add_argument("--budget-ms", type=positive_float, metavar="MS", help="time budget of one batch (default 5000)")
    p.add_argument("--fail-open", nargs="?", const=["timeout"], type=kinds_of(FAIL_OPEN_KINDS), metavar="KINDS",
                   help="allow (instead of deny) a batch whose check failed in one of KINDS: timeout (it "
                        "overran its budget; the default) and/or error (the policy raised on a batch the "
                        "schema accepts, which an agent can bring about on purpose), e.g. --fail-open "
                        "timeout,error. Refused records, damaged or oversized state always deny")
    p.add_argument("--keep-denied", action="store_true", help="denied batches join the session's past")
    p.add_argument("--max-record-bytes", type=int_at_least(1024), metavar="BYTES",
                   help="larger records are dead-lettered (default 1000000)")
    p.add_argument("--max-verdict-violations", type=int_at_least(1), metavar="N",
                   help="violations listed in one verdict; the rest are counted, their alerts still go out "
                        "(default 200)")
    p.add_argument("--verdict-memory", type=int_at_least(1), metavar="N",
                   help="recent batches per session whose verdict a redelivery repeats (default 64)")
    p.add_argument("--history", type=int_at_least(1), metavar="EVENTS",
                   help="events of the past the reference engine (and rules the incremental engine cannot "
                        "compile) see; with --policy-registry also the events each session keeps so that a "
                        "new policy version rebuilds its past (default 2000)")
    allow_import_arg(p)
    limits = p.add_argument_group("limits", "what one record may cost (README: Limits)")
    for name, (metavar, low, text) in LIMIT_FLAGS.items():
        default = WorkerSettings.model_fields[name].default
        limits.add_argument("--" + name.replace("_", "-"), type=int_at_least(low), metavar=metavar,
                            help=f"{text} (default {default})")
    p.add_argument("--metrics-port", type=port, metavar="PORT", help="serve Prometheus /metrics on this port")
    p.add_argument("--guarantee", choices=["at-least-once", "exactly-once"],
                   help="at-least-once (default): a verdict goes out as soon as it is decided, a crash "
                        "may repeat one; exactly-once: verdicts, alerts, state and offsets commit in one "
                        "Kafka transaction (readers use read_committed)")
    p.add_argument("--commit-interval-ms", type=positive_float, metavar="MS",
                   help="how often offsets are committed (default 200) or transactions closed under "
                        "exactly-once (default 50: what a verdict reader waits at most)")
    p.add_argument("--session-ttl", type=non_negative_float, metavar="S",
                   help="forget a session idle this many seconds (its state is tombstoned); 0 = never "
                        "(default 86400)")
    p.add_argument("--worker-id", help="name of this worker in logs and metrics")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], default="warning")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.set_defaults(func=cmd_run)


def _add_topics(sub: Any) -> None:
    t = sub.add_parser("topics", help="provision topics, regenerate JSON Schemas")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="create the deployment's topics (idempotent) and print a table")
    kafka_args(tc)
    tc.add_argument("--partitions", type=int_at_least(1), metavar="N", help="partitions of the events topic")
    tc.add_argument("--partition", action="append", metavar="TOPIC=N",
                    help="partitions of one topic, e.g. alerts=3 (repeatable)")
    tc.add_argument("--replication-factor", type=int, metavar="N", help="-1 = the broker's default")
    tc.add_argument("--increase-partitions", action="store_true",
                    help="allow adding partitions to existing topics (moves sessions!)")
    tc.set_defaults(func=cmd_topics_create)
    ts = tsub.add_parser("schemas", help="regenerate topics/schemas/*.schema.json from the models")
    ts.add_argument("--out", metavar="DIR", help="folder (default topics/schemas)")
    ts.set_defaults(func=cmd_topics_schemas)


def _add_produce(sub: Any) -> None:
    pr = sub.add_parser("produce", help="publish EventBatch records (JSON, JSONL or a sample session)",
                        description="Publish EventBatch records from a file or stdin: one JSON object, a JSON "
                                    "list, JSON Lines, or a sample session file (examples/sessions/*.json). "
                                    "A record without batch_id gets a fresh one.")
    pr.add_argument("file", nargs="?", help="input file ('-' or none: stdin)")
    kafka_args(pr)
    pr.add_argument("--wait", action="store_true", help="wait for each batch's verdict and print it")
    pr.add_argument("--timeout", type=positive_float, default=30.0, metavar="S",
                    help="seconds to wait for a verdict with --wait (default 30)")
    pr.add_argument("--session-id", help="override the session id of every record")
    pr.add_argument("--policy-id", help="set the policy id of every record")
    pr.add_argument("--json", action="store_true", help="print JSON lines")
    pr.set_defaults(func=cmd_produce)


def _add_tail(sub: Any) -> None:
    tl = sub.add_parser("tail", help="print verdicts, alerts or dead letters as they arrive")
    tl.add_argument("topic", choices=["verdicts", "alerts", "deadletter"])
    kafka_args(tl)
    tl.add_argument("--from-beginning", action="store_true", help="start at the earliest record")
    tl.add_argument("--max", type=int_at_least(1), metavar="N", help="stop after N records")
    tl.add_argument("--timeout", type=positive_float, metavar="S", help="stop after S seconds")
    tl.add_argument("--idle", type=positive_float, metavar="S", help="stop after S seconds without a record")
    tl.add_argument("--session", help="only this session's records")
    tl.add_argument("--json", action="store_true", help="one JSON record per line")
    tl.set_defaults(func=cmd_tail)


def _add_broker(sub: Any) -> None:
    b = sub.add_parser("broker", help="a local single-node Kafka broker from Kafka's jars")
    b.add_argument("action", choices=["start", "stop", "status", "fetch"],
                   help="start/stop/status of the background broker; fetch = download the jars only")
    b.add_argument("--port", type=port, help="listener port for start (default: a free one)")
    b.add_argument("--timeout", type=positive_float, default=120.0, metavar="S",
                   help="seconds to wait for the broker to start (default 120)")
    b.add_argument("--verbose", action="store_true", help="show Maven's output on fetch")
    b.set_defaults(func=cmd_broker)


def _add_policy(sub: Any) -> None:
    po = sub.add_parser("policy", help="check and explain policies; publish and manage them in the registry")
    posub = po.add_subparsers(dest="action", required=True, metavar="ACTION")
    pc = posub.add_parser("check", help="parse a policy file or folder and report")
    pc.add_argument("path", metavar="FILE|DIR")
    allow_import_arg(pc)
    pc.set_defaults(func=cmd_policy_check)
    pe = posub.add_parser("explain", help="per rule: which engine evaluates it and why")
    pe.add_argument("path", metavar="FILE|DIR")
    pe.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    pe.add_argument("--json", action="store_true")
    allow_import_arg(pe)
    pe.set_defaults(func=cmd_policy_explain)
    register_registry(posub)  # publish, list, show, history, rollback, diff, promote, keygen, shadow-report


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="play the sample sessions through a worker and show the verdicts",
                       description="Start a local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), create "
                                   "topics under a fresh prefix, start a worker, play the sample sessions "
                                   "and compare every verdict with its expectation (exit 0 iff all match).")
    d.add_argument("--policy", metavar="FILE|DIR", help="policy (default examples/policies)")
    d.add_argument("--sessions", metavar="DIR|FILE", help="sample sessions (default examples/sessions)")
    d.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    d.add_argument("--timeout", type=positive_float, default=60.0, metavar="S", help="per-verdict timeout")
    d.add_argument("--bootstrap-servers", type=host_ports, metavar="HOST:PORT",
                   help="use this cluster (default $KAFKA_BOOTSTRAP_SERVERS, else a broker the demo starts)")
    d.add_argument("--keep", action="store_true",
                   help="leave the broker and worker running afterwards (prints how to stop them)")
    d.set_defaults(func=cmd_demo)


def _add_top(sub: Any) -> None:
    tp = sub.add_parser("top", help="a live view of workers from their /metrics: throughput, latency, deny rate, "
                                    "top rules, lag per partition",
                        description="A live terminal view of one or more workers, read from their Prometheus "
                                    "/metrics (agent-monitor run --metrics-port). Rates are over the time between "
                                    "two scrapes; latency percentiles are produce-to-verdict.")
    tp.add_argument("--url", action="append", type=metrics_url, metavar="URL",
                    help="a worker's /metrics: HOST:PORT or a URL (repeatable; default 127.0.0.1:9464)")
    tp.add_argument("--token", help="bearer token (default: --token-file, else $AGENT_MONITOR_METRICS_TOKEN; a "
                                    "token on the command line is visible to other users of this machine)")
    tp.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file's first line")
    tp.add_argument("--interval", type=positive_float, default=2.0, metavar="S",
                    help="seconds between refreshes (default 2)")
    tp.add_argument("--once", action="store_true",
                    help="print one frame (two scrapes --interval apart) and exit; exit 1 if no worker answered")
    tp.add_argument("--rules", type=int_at_least(1), default=10, metavar="N", help="rules shown (default 10)")
    tp.add_argument("--partitions", type=int_at_least(1), default=24, metavar="N",
                    help="partitions shown, the most behind first (default 24)")
    tp.add_argument("--timeout", type=positive_float, default=5.0, metavar="S",
                    help="seconds to wait for each /metrics (default 5)")
    tp.set_defaults(func=cmd_top)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv_ = argv  # replay records its own command line in its manifest
    try:
        return int(args.func(args) or 0)
    except MonitorError as exc:  # each error says which exit code it means
        print(f"agent-monitor: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agent-monitor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `agent-monitor tail ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
