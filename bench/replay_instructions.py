"""Benchmark: CPU instructions per replayed batch, counted by valgrind (callgrind).

Wall-clock figures on a shared 2-core machine drift by a third from minute to minute; an
instruction count does not. This replays ``--small`` and then ``--large`` batches of the same
generated input (``bench/replay.py``'s sessions: 10 events per batch, 250 sessions) in one shard,
in process, under ``valgrind --tool=callgrind``, and prints the difference divided by the extra
batches: start-up (imports, policy parsing) cancels out, and what is left is the per-batch work
of reading, decoding, evaluating and spooling. Both runs go in parallel, one per core.

``--root`` measures another checkout (e.g. a ``git worktree`` of an older commit) with this
script, so two versions compare on the same input. Needs valgrind (``apt-get install valgrind``).

Run: ``make bench-replay-instructions`` (about three minutes; valgrind runs ~50x slower).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

CHILD = """
import asyncio, os, sys, tempfile
os.environ.setdefault("LOCAL_POLICY", "1")
sys.path.insert(0, sys.argv[1])
import monitor.replay as R
from monitor.policy import load_policy_set
try:
    from monitor.replay.run import evaluate_shard, fewer_collections
except ImportError:  # a checkout from before monitor/replay/ was a package
    evaluate_shard, fewer_collections = R._evaluate_shard, R._fewer_collections
inp, policy, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
req = R.ReplayRequest(inputs=[inp], policy=policy, out=inp + ".report.json", engine="incremental",
                      progress=False, workdir=os.path.dirname(inp), shards=1)
with fewer_collections():
    s = asyncio.run(evaluate_shard(req, 0, 1, tempfile.mkdtemp(dir=os.path.dirname(inp)), None,
                                   load_policy_set(policy), None))
assert s.counts.batches == n, (s.counts.batches, n)
"""


def main(argv: list[str] | None = None) -> int:
    from replay import POLICY, generate  # bench/replay.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT), help="checkout whose monitor package is measured")
    ap.add_argument("--small", type=int, default=500, help="batches of the smaller run")
    ap.add_argument("--large", type=int, default=2500, help="batches of the larger run")
    a = ap.parse_args(argv)
    if a.large <= a.small:
        ap.error("--large must be more batches than --small")
    if not shutil.which("valgrind"):
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-instr-") as tmp:
        d = Path(tmp)
        policy = d / "flow.gr"
        policy.write_text(POLICY)
        full = d / "all.jsonl"
        generate(full, a.large * 10, 250, 10)
        lines = full.read_text().splitlines(keepends=True)
        child = d / "child.py"
        child.write_text(CHILD)
        procs = {}
        for n in (a.small, a.large):
            inp = d / f"in-{n}.jsonl"
            inp.write_text("".join(lines[:n]))
            procs[n] = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg-{n}.out", sys.executable,
                 str(child), a.root, str(inp), str(policy), str(n)],
                env=dict(os.environ, PYTHONHASHSEED="0"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True)
        counts = {}
        for n, p in procs.items():
            err = p.communicate()[1]
            m = re.search(r"Collected : (\d+)", err)
            if p.returncode != 0 or not m:
                print(err[-3000:], file=sys.stderr)
                return 1
            counts[n] = int(m.group(1))
    per_batch = (counts[a.large] - counts[a.small]) / (a.large - a.small)
    print(f"{a.root}: {per_batch / 1000:,.0f} k instructions per batch of 10 events "
          f"({counts[a.small]:,} for {a.small} batches, {counts[a.large]:,} for {a.large})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
