"""``agent-monitor replay`` and ``agent-monitor verify``: their flags, and what they print."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from monitor.argtypes import int_at_least
from monitor.cli_options import allow_import_arg
from monitor.config import TopicNames, env_bootstrap
from monitor.console import make_console
from monitor.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from monitor.replay.request import ReplayError, ReplayRequest
from monitor.replay.run import ReplayResult, run_replay
from monitor.replay.sources import parse_offsets, parse_time
from monitor.replay.verify import verify_report

if TYPE_CHECKING:
    from rich.console import Console


def _print_summary(res: ReplayResult, console: Console) -> None:
    from rich.markup import escape
    from rich.table import Table

    r = res.report
    t = r.totals
    table = Table(title="replay summary")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in [("sessions", t.sessions), ("sessions denied", t.sessions_denied),
                        ("batches", t.batches), ("events", t.events),
                        ("allowed batches", t.decisions.get("allow", 0)),
                        ("denied batches", t.decisions.get("deny", 0)),
                        ("duplicate batches", r.manifest.counts.duplicates), ("bad input", t.bad_input),
                        ("events/s", f"{res.events_per_s:,.0f}")]:
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    if t.rules:
        rt = Table(title="violations by rule")
        for col in ("policy", "rule", "message", "severity", "violations", "sessions"):
            rt.add_column(col)
        for rule in t.rules:
            # rule messages and ids are data: "[risk=medium]" is no markup tag
            rt.add_row(escape(rule.policy_id or ""), str(rule.rule_index), escape(rule.message), rule.severity,
                       str(rule.violations), str(rule.sessions))
        console.print(rt)
    if r.compare is not None:
        c = r.compare
        ct = Table(title=f"compared with {escape(c.policy.policy_id)}: {c.sessions_changed} sessions change verdict")
        for col in ("session", "this policy", "other policy", "why"):
            ct.add_column(col)
        for ch in c.changes[:50]:
            why = "; ".join((b.violations or [b.reason or ""])[0] + " → " +
                            ((b.other_violations or [b.other_reason or "allowed"])[0])
                            for b in ch.batches[:3])
            ct.add_row(escape(ch.session_id), ch.decision, ch.other_decision, escape(why))
        console.print(ct)
    if r.bad_input:
        console.print(f"[yellow]{len(r.bad_input)} bad input records were skipped "
                      f"(first: {escape(r.bad_input[0].where)}: {escape(r.bad_input[0].reason)})")
    console.print(escape(f"report: {res.out}" + (f"  html: {res.html}" if res.html else "")))


def _console() -> Console:
    # wide enough that rule messages and paths are not wrapped in CI logs
    return make_console(stderr=True, width=160, highlight=True)


def _cmd_replay(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = _console()
    topic = args.topic or (TopicNames.for_prefix(args.prefix).events if args.prefix else None)
    if topic and args.inputs:
        console.print("[red]give either trace files or --topic/--prefix, not both")
        return EXIT_USAGE
    req = ReplayRequest(
        policy=args.policy, inputs=args.inputs, out=args.out, html=args.html, compare=args.compare,
        engine=args.engine, keep_denied=args.keep_denied, verdict_memory=args.verdict_memory,
        trace_batch=args.trace_batch, budget_ms=args.budget_ms, max_record_bytes=args.max_record_bytes,
        allow_imports=args.allow_import or [],
        bootstrap_servers=args.bootstrap_servers or (env_bootstrap() if topic or args.publish else None),
        topic=topic, from_time=args.from_time, to_time=args.to_time,
        from_offsets=args.from_offset, to_offsets=args.to_offset, partitions=args.partitions,
        publish_prefix=args.publish, shards=args.shards,
        progress=not args.no_progress and sys.stderr.isatty() or args.progress,
        command=["agent-monitor", *(getattr(args, "argv_", None) or sys.argv[1:])],
    )
    try:
        res = run_replay(req)
    except (ReplayError, ValueError, OSError) as exc:
        console.print(f"[red]replay failed: {escape(str(exc))}")
        return EXIT_USAGE
    _print_summary(res, console)
    if args.fail_on_deny and res.report.totals.decisions.get("deny", 0):
        return EXIT_FAILED
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from rich.markup import escape

    console = _console()
    try:
        res = verify_report(args.report, bootstrap_servers=args.bootstrap_servers)
    except (OSError, ValidationError) as exc:
        console.print(f"[red]cannot read the report {escape(args.report)}: {escape(str(exc))}")
        return EXIT_USAGE
    for note in res.notes:
        console.print(f"[yellow]note: {escape(note)}")
    if res.ok:
        print(f"OK: {args.report}: inputs, policy and all {res.verdicts_checked} verdicts and their "
              "violations are identical")
        return EXIT_OK
    print(f"FAILED: {args.report}")
    for p in res.problems:
        print(f"  - {p}")
    return EXIT_FAILED


def _time_arg(value: str) -> str:
    try:
        parse_time(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO time (2026-11-21T00:00:00Z) or milliseconds since the epoch, got {value!r}") from None
    return value


def _offsets_arg(value: str) -> int | dict[int, int]:
    try:
        offsets = parse_offsets(value)
    except ValueError:
        offsets = None
    pairs = [(0, offsets)] if isinstance(offsets, int) else list((offsets or {}).items())
    given = value.count(",") + 1 if isinstance(offsets, dict) else 1
    if offsets is None or any(p < 0 or o < 0 for p, o in pairs) or len(pairs) != given:
        raise argparse.ArgumentTypeError(
            f"expected an offset N for every partition or P:N,P:N per partition (each partition once), "
            f"got {value!r}")
    return offsets


def _partitions_arg(value: str) -> list[int]:
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        parts = []
    if not parts or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected partition numbers like 0,3, got {value!r}")
    return parts


def register_cli(subparsers: Any) -> None:
    """Add ``replay`` and ``verify`` to an argparse subparsers object; handlers are ``args.func``."""
    p = subparsers.add_parser(
        "replay", help="run a policy over recorded sessions (files or a topic) and write an audit report",
        description="Replay trace files/folders or a topic's time/offset range through a policy.")
    p.add_argument("inputs", nargs="*", help="trace files or folders (.json, .jsonl)")
    p.add_argument("--policy", required=True, help="policy file or folder (e.g. the one the worker runs)")
    p.add_argument("--compare", metavar="OTHER_POLICY", help="also run this policy and show what changes")
    p.add_argument("--engine", choices=["incremental", "reference"], default="incremental")
    p.add_argument("--out", "-o", default="replay-report.json", help="JSON report path")
    p.add_argument("--html", help="also write an HTML report here")
    p.add_argument("--bootstrap-servers", help="Kafka cluster (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--topic", help="replay this events topic")
    p.add_argument("--prefix", help="replay <prefix>.events")
    p.add_argument("--from-time", type=_time_arg, help="ISO time or epoch ms: first record to read")
    p.add_argument("--to-time", type=_time_arg, help="ISO time or epoch ms: stop before records from this time")
    p.add_argument("--from-offset", type=_offsets_arg, help="N or P:N,P:N (inclusive)")
    p.add_argument("--to-offset", type=_offsets_arg, help="N or P:N,P:N (exclusive)")
    p.add_argument("--partitions", type=_partitions_arg, help="only these partitions, e.g. 0,3")
    p.add_argument("--publish", metavar="PREFIX", help="send verdicts and alerts to PREFIX.verdicts/.alerts")
    p.add_argument("--keep-denied", action="store_true", help="denied batches join the session's past")
    p.add_argument("--verdict-memory", type=int, default=64, help="recent batch ids remembered per session")
    p.add_argument("--trace-batch", type=int, default=1, help="events per batch for plain traces")
    p.add_argument("--budget-ms", type=float, help="time budget per batch (default: none, for reproducibility)")
    p.add_argument("--max-record-bytes", type=int_at_least(1024), default=1_000_000,
                   help="records over this size are refused, as the worker refuses them (at least 1024)")
    allow_import_arg(p)
    p.add_argument("--shards", type=int_at_least(1), help="processes evaluating disjoint sessions "
                   "(default: 1, or up to 4 by cores for inputs over 16 MiB; a topic: 1)")
    p.add_argument("--progress", action="store_true", help="show the progress bar even without a terminal")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fail-on-deny", action="store_true", help="exit 1 when any batch is denied")
    p.set_defaults(func=_cmd_replay)
    v = subparsers.add_parser("verify", help="re-run a replay report from its manifest and compare",
                              description="Exit 0 iff inputs, policy and every verdict are identical.")
    v.add_argument("report")
    v.add_argument("--bootstrap-servers", help="override the cluster named in the manifest")
    v.set_defaults(func=_cmd_verify)
