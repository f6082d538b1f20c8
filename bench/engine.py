"""Benchmark: the cost of checking a session's last batch, incremental engine vs. the reference.

Policy: seed 004's flow rules (examples/policies: send_after_keyword, multi_turn_flow,
direct_succession, secrets_to_pr). Sessions of 100, 1,000 and 10,000 events are agent turns
(user message, assistant message with a tool call, tool output); conditions are selective as in
real sessions: two user messages say "send", one carries a token, two calls send email and two
create a PR, all within the first 45 turns. The last batch is one agent
step: an assistant message calling ``send_email`` and its output naming Peter, so every rule
matches against the session's past.

For each size it prints, side by side, the incremental engine's last-batch time (median of
repeated checks of the same batch on the same state), the reference's (invariant-ai
``a_analyze_pending`` on the whole past, in a subprocess with a 60 s limit; sizes past the first it
cannot finish are skipped), and the incremental session state size in bytes (its JSON). The
figures go to ``bench/results/engine.json``.

Run: ``make bench-engine`` (or ``.venv/bin/python bench/engine.py [--sizes 100,1000]``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LOCAL_POLICY", "1")
os.environ["INVARIANT_MAX_ITERATIONS"] = str(10**12)

POLICY_FILES = ["send_after_keyword.gr", "multi_turn_flow.gr", "direct_succession.gr",
                "secrets_to_pr.gr"]
REFERENCE_LIMIT_S = 60.0
BATCH = 3  # events per batch while the session is built (one agent turn)


def policy_text() -> str:
    return "\n".join((ROOT / "examples" / "policies" / f).read_text() for f in POLICY_FILES)


def session(n: int) -> list[dict]:
    """``n`` events of agent turns. Selective conditions: two user messages say "send" (turns 7
    and 20) and one carries an API key (turn 11), whatever the length, so the last batch has the
    same few violations at every size and its cost shows what the session length adds."""
    events: list[dict] = []
    turn = 0
    while len(events) < n:
        text = f"Please look at ticket {turn} and summarise it."
        if turn in (7, 20):
            text = f"Could you send the summary of ticket {turn} to the team?"
        if turn == 11:
            text = "My GitHub token is ghp_1234567890123456789012345678901234567890"
        tool = {9: "send_email", 22: "send_email", 15: "create_pr", 40: "create_pr"}.get(
            turn, ["search", "read_file"][turn % 2])
        events.append({"role": "user", "content": text})
        events.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{turn}", "type": "function",
             "function": {"name": tool, "arguments": {"query": f"ticket {turn}"}}}]})
        events.append({"role": "tool", "tool_call_id": f"c{turn}", "content": f"result {turn}"})
        turn += 1
    return events[:n]


def last_batch(n: int) -> list[dict]:
    return [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"last{n}", "type": "function",
             "function": {"name": "send_email", "arguments": {"to": "Peter", "body": "summary"}}}]},
        {"role": "tool", "tool_call_id": f"last{n}", "content": "Email sent to Peter"},
    ]


async def incremental_figures(n: int, repeats: int = 300) -> tuple[float, int, int]:
    from monitor.engine.incremental import IncrementalEngine
    from monitor.policy import load_policy_text

    engine = IncrementalEngine(load_policy_text(policy_text()))
    state = engine.initial_state()
    events = session(n - 2)
    for start in range(0, len(events), BATCH):
        result = await engine.check(state, events[start:start + BATCH])
        state = result.advance(state)
    batch = last_batch(n)
    gc.collect()  # garbage of building the session is not the last batch's cost
    times, matches = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = await engine.check(state, batch)
        times.append((time.perf_counter() - t0) * 1000)
        matches = len(result.matches)
    engine.close()
    state_bytes = len(state.model_dump_json().encode())
    return statistics.median(times), state_bytes, matches


def _reference_worker(n: int, queue) -> None:
    from monitor.policy import load_policy_text

    local = load_policy_text(policy_text()).local
    past, batch = session(n - 2), last_batch(n)
    t0 = time.perf_counter()
    result = asyncio.run(local.a_analyze_pending(past, batch))
    queue.put(((time.perf_counter() - t0) * 1000, len(result.errors)))


def reference_figure(n: int) -> tuple[float | None, int | None]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_reference_worker, args=(n, queue), daemon=True)
    proc.start()
    proc.join(REFERENCE_LIMIT_S + 15)  # + start-up (import, parse)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None, None
    try:
        ms, errors = queue.get(timeout=5)
    except Exception:  # noqa: BLE001 - the child died without an answer
        return None, None
    return (ms if ms <= REFERENCE_LIMIT_S * 1000 else None), errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    inc_ms, ref_ms, state_bytes = [], [], []
    reference_gave_up = False
    print(f"{'events':>8} {'incremental ms':>15} {'reference ms':>13} {'state bytes':>12} "
          f"{'violations inc/ref':>19}")
    for n in sizes:
        ms, size, found = asyncio.run(incremental_figures(n))
        ref, ref_found = (None, None) if reference_gave_up else reference_figure(n)
        reference_gave_up = reference_gave_up or ref is None
        inc_ms.append(round(ms, 3))
        ref_ms.append(None if ref is None else round(ref, 1))
        state_bytes.append(size)
        ref_text = f"{ref:13.1f}" if ref is not None else f"{'> 60 s' if ref_found is None else '-':>13}"
        print(f"{n:>8} {ms:>15.3f} {ref_text} {size:>12} {found:>9}/{'-' if ref_found is None else ref_found}")
    flat = max(inc_ms) / min(inc_ms)
    print(f"incremental last-batch time, largest/smallest: {flat:.2f}x (target: within 2x, "
          f"under 1 ms at 10,000 events)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "sizes": sizes, "incremental_ms": inc_ms, "reference_ms": ref_ms,
        "state_bytes": state_bytes,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
