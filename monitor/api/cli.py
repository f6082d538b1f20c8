"""``agent-monitor serve``: the HTTP API on uvicorn.

Example::

    agent-monitor serve --new-key ci               # prints a key (give it to the client) and its line
    echo 'ci:<sha256>' > keys.txt
    agent-monitor serve --api-keys keys.txt --policy examples/policies --port 8000
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from typing import Any

from monitor.argtypes import int_at_least, non_negative_float, port, positive_float
from monitor.cli_options import CliError, allow_import_arg, bootstrap_of, kafka_args, prefix_of
from monitor.errors import EXIT_OK

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("localhost")
    (True, True, False, True)
    """
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:

    if args.new_key:
        from monitor.api.security import KeyFileError, new_key

        try:
            key, line = new_key(args.new_key)
        except KeyFileError as exc:
            raise CliError(str(exc)) from None
        print(f"API key (give it to the client; it is not stored): {key}")
        print(f"line for --api-keys FILE or AGENT_MONITOR_API_KEYS: {line}")
        return EXIT_OK
    try:
        import uvicorn  # noqa: F401

        from monitor.api.app import SETTINGS_ENV, ServeSettings, create_app
        from monitor.api.security import KeyFileError
    except ImportError as exc:
        raise CliError(f"serve needs the http extra ({exc.name} is missing): "
                       "pip install 'agent-monitor[http]'") from None
    if args.no_auth and not is_loopback(args.host):
        raise CliError(f"--no-auth is only allowed on a loopback host, not {args.host}: give API "
                       "keys (--api-keys FILE or AGENT_MONITOR_API_KEYS)")
    fields: dict[str, Any] = {
        "host": args.host, "port": args.port, "policy_path": args.policy,
        "allow_policy_text": args.allow_policy_text, "api_keys_file": args.api_keys,
        "allow_imports": args.allow_import or [],
        "no_auth": args.no_auth, "max_body_bytes": args.max_body_bytes, "max_events": args.max_events,
        "policy_cache": args.policy_cache, "rate_limit": args.rate_limit, "rate_burst": args.rate_burst, "cors_origins": args.cors_origin or [],
        "budget_ms": None if args.budget_ms == 0 else args.budget_ms,
        "max_record_bytes": args.max_record_bytes,
        "max_verdict_violations": args.max_verdict_violations,
        "sessions": not args.no_sessions, "bootstrap_servers": bootstrap_of(args),
        "topic_prefix": prefix_of(args), "max_wait_s": args.max_wait,
        "connect_timeout": args.connect_timeout,
    }
    settings = ServeSettings(**fields)
    try:
        app = create_app(settings)  # refuses bad keys and policies before listening
    except (KeyFileError, ValueError) as exc:
        raise CliError(str(exc)) from None
    if settings.allow_policy_text:
        print("agent-monitor serve: WARNING: --allow-policy-text: requests may run their own policy "
              "text, in the policy sandbox (imports limited, no network, process or file write while "
              "it runs) but with this server's CPU and memory up to --budget-ms: trusted callers only",
              file=sys.stderr)
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"agent-monitor serve: {where} (docs {where}/docs); policies: "
          f"{', '.join(sorted(app.state.served)) or 'none'}; sessions: "
          f"{'off' if args.no_sessions else settings.topic_prefix + '.* at ' + settings.bootstrap_servers}",
          file=sys.stderr, flush=True)
    import uvicorn

    common = dict(host=args.host, port=args.port, log_level=args.log_level, server_header=False,
                  proxy_headers=False, timeout_keep_alive=5, limit_concurrency=args.max_connections,
                  h11_max_incomplete_event_size=16 * 1024)
    if args.workers > 1:
        os.environ[SETTINGS_ENV] = json.dumps(settings.model_dump(mode="json"))
        uvicorn.run("monitor.api.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(app, **common)
    return EXIT_OK


def register_cli(sub: Any) -> None:
    """Add ``serve`` to the ``agent-monitor`` subcommands."""
    p = sub.add_parser("serve", help="the HTTP API: invariant-compatible checks, sessions through Kafka",
                       description="Serve the HTTP API (OpenAPI and Swagger UI at /docs).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--policy", metavar="PATH", help="policy file or folder to serve by policy_id "
                   "and by exact text (as `run --policy`)")
    p.add_argument("--allow-policy-text", action="store_true", help="run policy text sent in "
                   "requests, in the policy sandbox (imports limited as for --policy; CPU and memory "
                   "only bounded by --budget-ms: trusted callers only)")
    allow_import_arg(p)
    p.add_argument("--api-keys", metavar="FILE", help="NAME:SHA256 per line (also "
                   "$AGENT_MONITOR_API_KEYS, comma-separated)")
    p.add_argument("--new-key", metavar="NAME", help="print a new API key and its NAME:SHA256 line, then exit")
    p.add_argument("--no-auth", action="store_true", help="no API keys (loopback hosts only)")
    p.add_argument("--max-body-bytes", type=int_at_least(1024), default=1_048_576,
                   help="largest request body (default 1 MiB)")
    p.add_argument("--max-events", type=int_at_least(1), default=2000,
                   help="events in one request, past and pending together (default 2000)")
    p.add_argument("--rate-limit", type=positive_float, default=50.0, metavar="N",
                   help="requests per second per API key (default 50)")
    p.add_argument("--rate-burst", type=int_at_least(1), default=100, help="burst per key (default 100)")
    p.add_argument("--policy-cache", type=int_at_least(1), default=64, metavar="N",
                   help="compiled request policies kept, by sha256 (default 64)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow this browser origin (repeatable; CORS is off without it)")
    p.add_argument("--budget-ms", type=non_negative_float, default=5000.0,
                   help="time budget of one check, as the worker's (default 5000; 0: none)")
    p.add_argument("--max-record-bytes", type=int_at_least(1024), default=1_000_000,
                   help="largest batch record published to Kafka, as the worker takes (default 1000000)")
    p.add_argument("--max-verdict-violations", type=int_at_least(1), default=200,
                   help="errors listed per answer; the rest are counted (default 200)")
    p.add_argument("--no-sessions", action="store_true", help="no Kafka: stateless endpoints only")
    p.add_argument("--max-wait", type=positive_float, default=60.0, metavar="S",
                   help="longest wait=true timeout a request may ask for (default 60)")
    p.add_argument("--workers", type=int_at_least(1), default=1, help="uvicorn worker processes")
    p.add_argument("--max-connections", type=int_at_least(1), default=512,
                   help="concurrent connections before 503 (default 512)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    kafka_args(p)
    p.set_defaults(func=cmd_serve)
