"""Benchmark: ``POST /api/monitor/check`` over HTTP against invariant-ai's ``LocalPolicy`` in process.

The request: 20 past events (agent turns: a user message, an assistant message calling
``ipython_run_cell`` or ``cmd_run``, its output; one call carries a GitHub token) and one pending
event (a ``cmd_run`` call with an AWS key), checked against ``examples/policies/secrets_in_code.gr``
(three ``secrets`` rules): one violation per check.

Side by side, for 1, 8 and 32 concurrent clients, each for ``--seconds`` (after a warm-up):

- ``http``: ``agent-monitor serve`` in its own process (one uvicorn worker, a bearer key, the
  operator's policy sent by its text), driven by asyncio clients (aiohttp, keep-alive) in this
  one; client and server share the machine's cores;
- ``local_policy``: invariant-ai's ``LocalPolicy.a_analyze_pending(past, pending)`` in this
  process, that many concurrent tasks on one event loop (the notes' advice: one LocalPolicy shared);
- ``engine``: the server's own check (:class:`monitor.api.analysis.Analyzer`) in this process, no
  HTTP: what the HTTP layer costs is the difference.

``http`` and ``engine`` repeat one request, so the server reuses the state after its past (as for a
client that monitors a session statelessly); ``http_new_past`` and ``engine_new_past`` change the
past's first message in every request, so the whole past is checked each time, as ``LocalPolicy``
always does.

Requests/s, p50 and p99 latency (ms) go to ``bench/results/http.json`` with the date and command.
Every answer is checked (status 200, the one expected violation), so a fast wrong answer cannot
count.

Run: ``make bench-http`` (or ``.venv/bin/python bench/http_api.py --seconds 5``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LOCAL_POLICY", "1")

POLICY_FILE = ROOT / "examples" / "policies" / "secrets_in_code.gr"
CONCURRENCY = (1, 8, 32)
TOKEN = "ghp_1234567890123456789012345678901234567890"
AWS = "AKIAIOSFODNN7EXAMPLE"


def events() -> tuple[list[dict], list[dict]]:
    """20 past events and 1 pending event."""
    past: list[dict] = []
    turn = 0
    while len(past) < 20:
        cid = f"c{turn}"
        tool, key = ("ipython_run_cell", "code") if turn % 2 == 0 else ("cmd_run", "command")
        value = f"print({turn})" if tool == "ipython_run_cell" else f"ls -la /tmp/{turn}"
        if turn == 3:
            value = f"curl -H 'Authorization: token {TOKEN}' https://api.github.com/user"
        past.append({"role": "user", "content": f"Step {turn}: please look at ticket {turn}."})
        past.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": tool, "arguments": {key: value}}}]})
        past.append({"role": "tool", "tool_call_id": cid, "content": f"output of step {turn}"})
        turn += 1
    past = past[:20]
    pending = [{"id": "p1", "type": "function", "function": {
        "name": "cmd_run", "arguments": {"command": f"export AWS_ACCESS_KEY_ID={AWS} && aws s3 ls"}}}]
    return past, pending


def summary(latencies: list[float], elapsed: float) -> dict:
    lat = sorted(latencies)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 3)  # noqa: E731
    return {"requests": len(lat), "requests_per_s": round(len(lat) / elapsed, 1),
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "mean_ms": round(statistics.fmean(lat) * 1000, 3)}


async def drive(call, concurrency: int, seconds: float, warmup: float = 1.0) -> dict:
    """``concurrency`` loops calling ``call()`` for ``warmup + seconds``; the warm-up is not counted."""
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds
    latencies: list[float] = []

    async def loop() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return summary(latencies, time.perf_counter() - measure_from)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def varied(body: dict, n: int) -> dict:
    """The same request with a past no earlier request had (its first message differs)."""
    past = list(body["past_events"])
    past[0] = {**past[0], "content": f"{past[0]['content']} (request {n})"}
    return {**body, "past_events": past}


async def bench_http(url: str, key: str, body: dict, seconds: float, new_past: bool) -> dict:
    # aiohttp (invariant-ai's own HTTP client) as the load generator: it costs the shared cores
    # less per request than httpx, which the tests use
    import aiohttp

    out = {}
    counter = iter(range(10**9))
    label = "http_new_past" if new_past else "http"
    url = url + "/api/monitor/check"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    fixed = json.dumps(body).encode()
    for n in CONCURRENCY:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector, headers=headers) as client:
            async def call() -> None:
                data = json.dumps(varied(body, next(counter))).encode() if new_past else fixed
                async with client.post(url, data=data) as r:
                    answer = await r.json()
                    if r.status != 200 or len(answer) != 1:
                        raise RuntimeError(f"unexpected answer {r.status}: {str(answer)[:300]}")

            out[str(n)] = await drive(call, n, seconds)
        print(f"  {label:<14}{n:>2} clients: {out[str(n)]}", flush=True)
    return out


async def bench_local(policy_text: str, past: list[dict], pending: list[dict], seconds: float) -> dict:
    from invariant.analyzer.policy import LocalPolicy

    from monitor.detectors import install

    install()
    local = LocalPolicy.from_string(policy_text)
    out = {}
    for n in CONCURRENCY:
        async def call() -> None:
            result = await local.a_analyze_pending(past, pending)
            if len(result.errors) != 1:
                raise RuntimeError(f"LocalPolicy found {len(result.errors)} errors, expected 1")

        out[str(n)] = await drive(call, n, seconds)
        print(f"  local_policy  {n:>2} clients: {out[str(n)]}", flush=True)
    return out


async def bench_engine(policy_text: str, past: list[dict], pending: list[dict], seconds: float,
                       new_past: bool) -> dict:
    from monitor.api.analysis import Analyzer, PolicyCache
    from monitor.config import WorkerSettings

    analyzer = Analyzer(WorkerSettings(policy_path="-"), PolicyCache(4))
    compiled = await analyzer.cache.compile(policy_text)
    body = {"past_events": past, "pending_events": pending}
    counter = iter(range(10**9))
    label = "engine_new_past" if new_past else "engine"
    out = {}
    for n in CONCURRENCY:
        async def call() -> None:
            the_past = varied(body, next(counter))["past_events"] if new_past else past
            if len(await analyzer.check(compiled, the_past, pending)) != 1:
                raise RuntimeError("the engine did not find the one violation")

        out[str(n)] = await drive(call, n, seconds)
        print(f"  {label:<14}{n:>2} clients: {out[str(n)]}", flush=True)
    analyzer.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per level (default 8)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "http.json"))
    args = ap.parse_args()

    from monitor.api.security import new_key

    load_start = list(os.getloadavg())
    policy_text = POLICY_FILE.read_text()
    past, pending = events()
    body = {"past_events": past, "pending_events": pending, "policy": policy_text}
    key, line = new_key("bench")
    port = free_port()
    env = {**os.environ, "AGENT_MONITOR_API_KEYS": line}
    cmd = [sys.executable, "-m", "monitor.cli", "serve", "--port", str(port), "--policy", str(POLICY_FILE),
           "--no-sessions", "--rate-limit", "1000000", "--rate-burst", "1000000", "--log-level", "error"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        print(f"POST /api/monitor/check, {len(past)} past + {len(pending)} pending events, "
              f"{POLICY_FILE.name}, {args.seconds:g} s per level", flush=True)
        results = {"http": asyncio.run(bench_http(url, key, body, args.seconds, False)),
                   "http_new_past": asyncio.run(bench_http(url, key, body, args.seconds, True))}
    finally:
        server.terminate()
        server.wait(30)
    results["local_policy"] = asyncio.run(bench_local(policy_text, past, pending, args.seconds))
    results["engine"] = asyncio.run(bench_engine(policy_text, past, pending, args.seconds, False))
    results["engine_new_past"] = asyncio.run(bench_engine(policy_text, past, pending, args.seconds, True))
    from importlib.metadata import version

    report = {
        "benchmark": "POST /api/monitor/check: 20 past events + 1 pending, secrets rules",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "make bench-http (" + " ".join(["bench/http_api.py", f"--seconds {args.seconds:g}"]) + ")",
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    # other work on the machine shows here: compare figures of one run only
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg())},
        "versions": {p: version(p) for p in ("agent-monitor", "invariant-ai", "fastapi", "uvicorn",
                                               "uvloop", "httptools", "aiohttp")},
        "concurrency": list(CONCURRENCY),
        "policy": str(POLICY_FILE.relative_to(ROOT)),
        "seconds_per_level": args.seconds,
        "results": results,
        "notes": ("http: server and clients share the machine's cores; local_policy and engine run "
                  "in process, concurrent tasks on one event loop. http and engine send the same "
                  "past every time (the server reuses the state after it: PastStates); "
                  "*_new_past change the first past message per request, so the whole past is "
                  "checked every time, as invariant-ai's LocalPolicy always does"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
