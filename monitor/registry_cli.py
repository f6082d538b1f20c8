"""``agent-monitor policy publish|list|show|history|rollback|diff|promote|keygen|shadow-report``: the
policy registry (:mod:`monitor.registry`) from the command line.

Example::

    agent-monitor policy keygen --out ops                    # ops.key (keep it), ops.pub (give it to workers)
    agent-monitor policy publish examples/policies/send_after_keyword.gr --id send --signing-key ops.key
    agent-monitor run --policy-registry --policy-public-key ops.pub
    agent-monitor policy publish send_v2.gr --id send --shadow --signing-key ops.key
    agent-monitor policy shadow-report send
    agent-monitor policy promote send --signing-key ops.key
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from monitor import sandbox, signing
from monitor.argtypes import int_at_least
from monitor.cli_options import CliError, allow_import_arg, bootstrap_of, kafka_args, prefix_of
from monitor.errors import EXIT_OK
from monitor.models import PolicyRecord
from monitor.registry import (
    Registry,
    RegistryView,
    check_policy_id,
    describe_record,
    diff_records,
    parse_action_args,
    prepare_record,
    read_records,
    record_json,
)


def _registry(args: argparse.Namespace, signed: bool = False) -> Registry:
    from monitor.client import wait_for_broker

    key = None
    if signed:
        path = args.signing_key or os.environ.get(signing.SIGNING_KEY_ENV)
        if path:
            key = signing.load_private_key(path)
        else:
            print("agent-monitor: no --signing-key (or $AGENT_MONITOR_POLICY_SIGNING_KEY): the record is "
                  "unsigned, and workers started with --policy-public-key will refuse it", file=sys.stderr)
    bootstrap = bootstrap_of(args)
    wait_for_broker(bootstrap, args.connect_timeout)
    return Registry(bootstrap, prefix_of(args), signing_key=key)


def _show(record: PolicyRecord, as_json: bool, verb: str | None = None) -> None:
    if as_json:
        print(record_json(record))
    else:
        print(f"{verb + ' ' if verb else ''}{describe_record(record)}")


# -- the commands -----------------------------------------------------------------------------------

def cmd_publish(args: argparse.Namespace) -> int:
    sandbox.set_allowed_imports(args.allow_import or [])
    check_policy_id(args.id)
    actions = parse_action_args(args.action or [])
    # parse and refuse a bad or unsafe policy before anything reaches Kafka
    record = prepare_record(args.path, args.id, actions, author=args.author, note=args.note)
    registry = _registry(args, signed=True)
    final = registry.publish(record, "shadow" if args.shadow else "active")
    _show(final, args.json, "published")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    view = _registry(args).read()
    if args.json:
        print(json.dumps([_summary(view, pid) for pid in view.ids()], indent=2))
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    from monitor.console import make_console

    table = Table("policy", "active", "sha256", "rules", "signed by", "author", "published", "shadow candidate",
                  title=f"policies in {_registry_topic(args)}")
    for pid in view.ids():
        active, cand = view.active(pid), view.candidate(pid)
        if active is None:
            table.add_row(Text(pid), "-", "", "", "", "", "", Text(f"v{cand.version}") if cand else "")
            continue
        logged = sum(1 for a in active.actions.values() if a == "log")
        table.add_row(Text(pid), f"v{active.version}", active.sha256[:12],
                      f"{len(active.rules)}{f' ({logged} log)' if logged else ''}", active.key_id or "unsigned",
                      Text(active.author), f"{active.created_at:%Y-%m-%d %H:%M:%S}Z",
                      Text(f"v{cand.version} {cand.sha256[:12]}") if cand else "")
    make_console().print(table)
    for line in view.unreadable:
        print(f"unreadable record: {line}", file=sys.stderr)
    return EXIT_OK


def _summary(view: RegistryView, pid: str) -> dict[str, Any]:
    active, cand = view.active(pid), view.candidate(pid)
    return {"policy_id": pid, "active_version": active.version if active else None,
            "sha256": active.sha256 if active else None, "candidate_version": cand.version if cand else None,
            "versions": sorted(view.versions.get(pid, {}))}


def _registry_topic(args: argparse.Namespace) -> str:
    from monitor.config import TopicNames

    return TopicNames.for_prefix(prefix_of(args)).policies


def cmd_show(args: argparse.Namespace) -> int:
    view = _registry(args).read()
    if args.version is not None:
        record = view.version(args.id, args.version)
    else:
        view.history(args.id)  # an unknown id names the known ones
        found = view.active(args.id) or view.candidate(args.id)
        if found is None:
            raise CliError(f"policy {args.id!r} has no active version (see policy history {args.id})")
        record = found
    if args.json:
        print(record_json(record))
        return EXIT_OK
    print(describe_record(record))
    for index, message in enumerate(record.rules):
        print(f"  rule {index} [{record.actions.get(str(index), 'block')}]: {message}")
    if record.sources:
        print(f"  from {', '.join(record.sources)}")
    print()
    print(record.text, end="" if record.text.endswith("\n") else "\n")
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    view = _registry(args).read()
    records = view.history(args.id)
    active, cand = view.active(args.id), view.candidate(args.id)
    if args.json:
        print(json.dumps([r.model_dump(mode="json", exclude={"text"}) for r in records], indent=2))
        return EXIT_OK
    for r in records:
        mark = " <- active" if active and r.version == active.version else (
            " <- shadow candidate" if cand and r.version == cand.version else "")
        print(f"{describe_record(r)}{mark}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    final = _registry(args, signed=True).rollback(args.id, args.to, author=args.author)
    _show(final, args.json, "published")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    view = _registry(args).read()
    print(diff_records(view.version(args.id, args.a), view.version(args.id, args.b)), end="")
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    final = _registry(args, signed=True).promote(args.id, author=args.author)
    _show(final, args.json, "promoted")
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    private, public, kid = signing.write_keypair(args.out)
    print(f"key id {kid}\nprivate key (sign with it: policy publish --signing-key): {private}\n"
          f"public key (give it to workers: run --policy-public-key): {public}")
    return EXIT_OK


def cmd_shadow_report(args: argparse.Namespace) -> int:
    from monitor.config import TopicNames
    from monitor.shadow import read_shadow, summarise

    registry = _registry(args)
    topic = TopicNames.for_prefix(prefix_of(args)).shadow
    records, bad = read_shadow(v for _k, v in read_records(registry.bootstrap, topic, args.timeout))
    report = summarise(records, args.id, args.version)
    report.unreadable = bad
    if args.json:
        print(report.model_dump_json(indent=2))
        return EXIT_OK
    from rich.markup import escape

    from monitor.console import make_console

    console = make_console()
    versions = ", ".join(f"v{v}" for v in report.candidate_versions) or "none"
    active = ", ".join(f"v{v}" for v in report.active_versions) or "none"
    console.print(f"shadow report of {escape(args.id)}: candidate {versions} beside active {active}, read from "
                  f"{topic}")
    console.print(f"batches compared {report.batches} in {report.sessions} session(s); differing "
                  f"{report.differing}: [red]{report.newly_denied} newly denied[/], [green]{report.newly_allowed} "
                  f"newly allowed[/], {report.other_rules} with other rules; candidate checks that failed "
                  f"{report.candidate_failures}")
    for r in report.rules:
        console.print(escape(f"  rule {r.rule!r}: only the candidate {r.candidate_only}, only the active "
                             f"{r.active_only}, both {r.both}"))
    for s in report.differing_sessions[: args.sessions]:
        console.print(escape(f"  session {s.session_id}: {s.differing} of {s.batches} batch(es) differ, first "
                             f"{s.first_batch}"))
    if len(report.differing_sessions) > args.sessions:
        console.print(f"  ... and {len(report.differing_sessions) - args.sessions} more session(s) (--sessions N)")
    if bad:
        console.print(f"[yellow]{bad} record(s) of {topic} could not be read[/]")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------------------

def _signed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--signing-key", metavar="FILE",
                   help=f"sign with this Ed25519 private key (PEM; default ${signing.SIGNING_KEY_ENV}); "
                        "workers with --policy-public-key refuse unsigned records")
    p.add_argument("--author", help="who publishes (default: the login name)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")


def register_cli(posub: Any) -> None:
    """Add the registry commands to ``agent-monitor policy``."""
    p = posub.add_parser("publish", help="publish a policy file or folder as the next version of a policy id",
                         description="Parse the policy in the sandbox (refusing a bad or unsafe one with "
                                     "file:line and why, before anything reaches Kafka) and publish it to "
                                     "<prefix>.policies as the next version of --id.")
    p.add_argument("path", metavar="FILE|DIR")
    p.add_argument("--id", required=True, help="the policy id batches name (letters, digits, . _ -)")
    p.add_argument("--action", action="append", metavar="RULE=block|log",
                   help="a rule's action (RULE: its index or its message); overrides [action=...] in the "
                        "message; repeatable")
    p.add_argument("--shadow", action="store_true",
                   help="a candidate: checked beside the active version on live traffic, its verdicts to "
                        "<prefix>.shadow only (policy shadow-report, policy promote)")
    p.add_argument("--note", help="a note kept with the version")
    allow_import_arg(p)
    _signed(p)
    kafka_args(p)
    p.set_defaults(func=cmd_publish)

    p = posub.add_parser("list", help="the registry's policies: active version, candidate")
    p.add_argument("--json", action="store_true")
    kafka_args(p)
    p.set_defaults(func=cmd_list)

    p = posub.add_parser("show", help="one version of a policy (default: the active one), with its text")
    p.add_argument("id")
    p.add_argument("--version", type=int_at_least(1), metavar="N")
    p.add_argument("--json", action="store_true")
    kafka_args(p)
    p.set_defaults(func=cmd_show)

    p = posub.add_parser("history", help="every version of a policy")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    kafka_args(p)
    p.set_defaults(func=cmd_history)

    p = posub.add_parser("rollback", help="publish an earlier version's text and actions as the next version")
    p.add_argument("id")
    p.add_argument("--to", type=int_at_least(1), required=True, metavar="N", help="the version to go back to")
    _signed(p)
    kafka_args(p)
    p.set_defaults(func=cmd_rollback)

    p = posub.add_parser("diff", help="what changed between two versions (text and actions)")
    p.add_argument("id")
    p.add_argument("a", type=int_at_least(1), metavar="A")
    p.add_argument("b", type=int_at_least(1), metavar="B")
    kafka_args(p)
    p.set_defaults(func=cmd_diff)

    p = posub.add_parser("promote", help="make the shadow candidate the active version")
    p.add_argument("id")
    _signed(p)
    kafka_args(p)
    p.set_defaults(func=cmd_promote)

    p = posub.add_parser("keygen", help="make an Ed25519 key pair for signing policy records")
    p.add_argument("--out", default="policy-signing", metavar="BASE",
                   help="writes BASE.key (mode 0600) and BASE.pub (default policy-signing); never overwrites")
    p.set_defaults(func=cmd_keygen)

    p = posub.add_parser("shadow-report", help="where a shadow candidate and the active version differ",
                         description="Read <prefix>.shadow and summarise where the candidate's verdicts differ "
                                     "from the active version's: batches, decisions, rules, sessions.")
    p.add_argument("id")
    p.add_argument("--version", type=int_at_least(1), metavar="N", help="only candidate version N")
    p.add_argument("--sessions", type=int_at_least(1), default=20, metavar="N", help="sessions listed (default 20)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds to read the topic (default 60)")
    p.add_argument("--json", action="store_true")
    kafka_args(p)
    p.set_defaults(func=cmd_shadow_report)
