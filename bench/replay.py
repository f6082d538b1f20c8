"""Benchmark: replay throughput (events/s) and peak memory over generated sessions.

Generates ``--events`` events (default 1,000,000) over ``--sessions`` sessions (default 10,000) as
a JSONL file of EventBatch records, ``--batch`` events per record (default 10), with the sessions
interleaved round-robin as they would be on a topic (every session open until the end). Each
session is agent turns (user message, assistant tool call, tool output); one session in 50 has a
user asking to "send" followed by a ``send_email`` call, which the seed-004 flow rule denies:

    raise "Must not call tool after user uses keyword" if:
        (msg: Message) -> (tool: ToolCall)
        msg.role == "user"
        "send" in msg.content
        tool is tool:send_email

The replay (``monitor.replay.run_replay``: read, evaluate with ``make_engine(policy, "incremental")``,
spool results, write the sorted JSON report) runs in a fresh process, so its peak RSS is its own.
It runs ``--repeat`` times (default 3) and the median run is reported: this machine's speed
drifts by a third from one minute to the next, so one run says little.

Side by side in the same run:

- the reference engine (invariant-ai itself) and the incremental one replay the same slice of
  ``--reference-events`` events (default 2,000, sessions as long as in the full input), one shard
  each: the reference re-analyses a session's whole trace per batch;
- a replay of half the events over the same sessions (skip it with ``--no-scaling``), to show
  how peak memory depends on the number of events. Both sizes are past the fixed write buffers
  (a shard spools every 5,000 results and 20,000 verdict records), so what is left to grow is
  per session: its engine state, which is flat, and the ids of its last ``--verdict-memory``
  batches (default 64), which the worker keeps to answer a redelivered batch. Peak RSS is printed
  for the replay's own process and its shards apart.

The figures go to ``bench/results/replay.json``.

Run: ``make bench-replay`` or ``.venv/bin/python bench/replay.py --events 100000 --sessions 1000``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LOCAL_POLICY", "1")

POLICY = '''raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email
'''


def _event(session: int, i: int, risky: bool) -> dict:
    """Event ``i`` of a session: turns of (user, assistant tool call, tool output)."""
    turn, kind = divmod(i, 3)
    if kind == 0:
        text = (f"Could you send the notes of ticket {turn} to the team?" if risky and turn == 3
                else f"Please look at ticket {turn} of project {session} and summarise it.")
        return {"role": "user", "content": text}
    tool = "send_email" if risky and turn == 5 else ("search", "read_file")[turn % 2]
    if kind == 1:
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"c{turn}", "type": "function",
            "function": {"name": tool, "arguments": {"query": f"ticket {turn}", "n": turn}}}]}
    return {"role": "tool", "tool_call_id": f"c{turn}", "content": f"{tool} result for ticket {turn}: ok"}


def generate(path: Path, events: int, sessions: int, batch: int) -> int:
    """Write the JSONL input (streaming: constant memory); returns the number of events written."""
    per_session = max(1, events // sessions)
    rounds = -(-per_session // batch)
    written = 0
    with path.open("w") as fh:
        for r in range(rounds):
            lo, hi = r * batch, min(per_session, (r + 1) * batch)
            for s in range(sessions):
                risky = s % 50 == 0
                rec = {"session_id": f"session-{s:06d}", "batch_id": f"b{r}", "seq": r,
                       "events": [_event(s, i, risky) for i in range(lo, hi)],
                       "metadata": {"agent": "bench"}, "produced_at": "2026-01-01T00:00:00Z"}
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
                written += hi - lo
    return written


def _replay_child(args: tuple, queue: mp.Queue) -> None:
    from monitor.engine import make_engine
    from monitor.policy import load_policy
    from monitor.replay import ReplayRequest, run_replay

    inp, policy, out, engine, shards, verdict_memory = args
    kind = type(make_engine(load_policy(policy), engine)).__name__
    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_replay(ReplayRequest(inputs=[inp], policy=policy, out=out, engine=engine, progress=False,
                                   workdir=str(Path(out).parent), shards=shards,
                                   verdict_memory=verdict_memory))
    seconds = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(c0, c1, strict=False))
    t = res.report.totals
    # the replay's own process plus its shard processes (an upper bound: forked pages are shared)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    queue.put({"seconds": seconds, "peak_rss_mib": res.peak_rss_mib, "parent_rss_mib": own, "events": t.events, "engine": kind,
               "shards": res.shards, "cpu_seconds": cpu,
               "sessions": t.sessions, "denied_sessions": t.sessions_denied, "batches": t.batches,
               "report_mib": Path(out).stat().st_size / 2**20})


def _verdict_lines(report: Path) -> list[tuple]:
    """(session, batch, decision, violation keys) of every batch of a report."""
    doc = json.loads(report.read_text())
    return [(s["session_id"], b["batch_id"], b["decision"], tuple(v["key"] for v in b["violations"]))
            for s in doc["sessions"] for b in s["batches"]]


def measure(inp: Path, policy: Path, out: Path, engine: str, shards: int | None,
            verdict_memory: int = 64) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_replay_child, args=((str(inp), str(policy), str(out), engine, shards, verdict_memory), q))
    p.start()
    res = q.get()
    p.join()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=10, help="events per EventBatch record")
    ap.add_argument("--engine", default="incremental", choices=["incremental", "reference"])
    ap.add_argument("--shards", type=int, default=None,
                    help="replay processes (default: as the replay picks: up to the cores for big inputs)")
    ap.add_argument("--verdict-memory", type=int, default=64,
                    help="recent batch ids a session remembers (replay's --verdict-memory)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false",
                    help="skip the second run with half the events (the memory comparison)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the full replay; the median is reported")
    ap.add_argument("--reference-events", type=int, default=2_000,
                    help="events of the slice both engines replay side by side (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "replay.json"))
    ap.add_argument("--tmp", default=None, help="folder for the generated input and the report")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-replay-", dir=a.tmp) as tmp:
        d = Path(tmp)
        policy = d / "flow.gr"
        policy.write_text(POLICY)
        per_session = max(1, a.events // a.sessions)
        if a.reference_events > 0:
            inp = d / "slice.jsonl"
            n = generate(inp, a.reference_events, max(1, a.reference_events // per_session), a.batch)
            side = {engine: measure(inp, policy, d / f"slice-{engine}.json", engine, 1)
                    for engine in ("reference", "incremental")}
            print(f"same {n:,} events ({per_session} per session), one shard each:")
            for engine, r in side.items():
                print(f"  {engine:12s} {r['events'] / r['seconds']:>10,.0f} events/s   {r['seconds']:6.2f} s   "
                      f"{len(_verdict_lines(d / f'slice-{engine}.json'))} verdicts, "
                      f"{r['denied_sessions']} denied session(s)", flush=True)
            same = _verdict_lines(d / "slice-reference.json") == _verdict_lines(d / "slice-incremental.json")
            print(f"  verdicts and violations identical: {same}", flush=True)
            inp.unlink()
        runs = [(a.events, "full")] + ([(a.events // 2, "half")] if a.scaling else [])
        results = {}
        for n, name in runs:
            inp = d / f"{name}.jsonl"
            t0 = time.perf_counter()
            written = generate(inp, n, a.sessions, a.batch)
            print(f"generated {written:,} events over {a.sessions:,} sessions "
                  f"({inp.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)
            # the smaller run uses as many shards as the full one, so the memory figures compare
            shards = a.shards if name == "full" else results["full"]["shards"]
            repeat = max(1, a.repeat) if name == "full" else 1
            tries = []
            for _ in range(repeat):
                r = measure(inp, policy, d / f"{name}-report.json", a.engine, shards, a.verdict_memory)
                r["events_per_s"] = r["events"] / r["seconds"]
                tries.append(r)
                print(f"{name}: {r['events']:,} events, {r['batches']:,} batches, {r['sessions']:,} sessions "
                      f"({r['denied_sessions']} denied) in {r['seconds']:.1f} s = {r['events_per_s']:,.0f} events/s; "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB (replay {r['parent_rss_mib']:.0f} + shards "
                      f"{r['peak_rss_mib'] - r['parent_rss_mib']:.0f}); report {r['report_mib']:.1f} MiB; engine {r['engine']}; "
                      f"{r['shards']} shard(s), {r['cpu_seconds']:.1f} CPU s",
                      flush=True)
            tries.sort(key=lambda r: r["seconds"])
            results[name] = dict(tries[len(tries) // 2], peak_rss_mib=max(r["peak_rss_mib"] for r in tries))
            if repeat > 1:
                print(f"{name}: median of {repeat} runs {results[name]['events_per_s']:,.0f} events/s "
                      f"(fastest {tries[0]['events_per_s']:,.0f}, slowest {tries[-1]['events_per_s']:,.0f})",
                      flush=True)
            inp.unlink()
    full = results["full"]
    out = {"events": full["events"], "seconds": round(full["seconds"], 2),
           "events_per_s": round(full["events_per_s"]), "peak_rss_mib": round(full["peak_rss_mib"], 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    if "half" in results:
        t = results["half"]
        print(f"peak RSS with {t['events']:,} events: {t['peak_rss_mib']:.0f} MiB; with {full['events']:,}: "
              f"{full['peak_rss_mib']:.0f} MiB (same {a.sessions:,} sessions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
